"""Calibration: the text, the engine that runs it through the model, and what observers collect.

``data`` and ``texts`` make the token windows; ``engine`` runs them layer by layer (or as whole
forwards) for observers; ``observers`` holds the statistics criteria and compensation share;
``fisher`` the loss's sensitivity per output; ``perplexity`` the evaluation on held-out text.
"""
