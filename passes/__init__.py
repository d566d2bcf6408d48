"""Graph passes of fxfusion (installed as ``fxfusion.passes``): trace, find, rewrite, quantize, fold, export."""
