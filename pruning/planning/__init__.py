"""Planning: the plan and the scores it is made from (``plan``, ``scores``), the global ranking
(``planner``) and the rounding of kept counts for inference engines (``rounding``)."""
