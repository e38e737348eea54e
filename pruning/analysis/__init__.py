"""Model analysis: exact parameter counts per layer, and what pruning removed.

``python -m pruning.analysis --model_path DIR [--compare_with DIR]`` runs it from the shell.
"""

from pruning.analysis.analyzer import ModelAnalyzer, analyze_inventory
from pruning.analysis.comparator import ModelComparator

__all__ = ["ModelAnalyzer", "ModelComparator", "analyze_inventory"]
