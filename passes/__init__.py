"""Graph passes of fxfusion (installed as ``fxfusion.passes``): trace, find, rewrite, quantize, deploy
(freeze, fold_plan, fold_apply), export, verify; dataflow holds the op facts they share."""
