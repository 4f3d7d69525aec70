"""Networks the conversion is tried on: a mimic of timm's fused norm layers, small mimics, real zoo nets."""
