"""The model to prune: built-in names (``builtin``), where each part lives (``placement``), loading
(``loading``) and layers streamed from disk when the model does not fit (``streaming``)."""
