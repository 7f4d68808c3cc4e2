"""fxopt rewrite passes (installed as ``fxopt.passes``)."""
