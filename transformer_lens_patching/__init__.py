"""Activation patching and path patching for TransformerLens models.

Everything public is listed in `__all__` and importable from here; `plots` (plotly
figures), `ioi` (the IOI task) and `analysis` (the circuit-analysis job on any task) are
public submodules with their own `__all__`. All
other modules are private. Importing the package installs the TransformerLens plugin
(`model.act_patch`, `cache[Node(...)]`, ...; see `plugin`).
"""

from . import analysis as analysis
from . import ioi as ioi
from ._core.circuit import Circuit as Circuit
from ._core.distributed import set_rank_timeout as set_rank_timeout
from ._core.formats import eap_ig_circuit as eap_ig_circuit
from ._core.formats import eap_ig_scores as eap_ig_scores
from ._core.formats import read_mib_submission as read_mib_submission
from ._core.formats import to_eap_ig_json as to_eap_ig_json
from ._core.formats import write_mib_submission as write_mib_submission
from ._core.graph import Edge as Edge
from ._core.graph import EdgeGraph as EdgeGraph
from ._core.graph import EdgeScores as EdgeScores
from ._core.graph import GraphNode as GraphNode
from ._core.nodes import IterNode as IterNode
from ._core.nodes import Node as Node
from ._core.nodes import SeqPos as SeqPos
from ._core.plan import Block as Block
from ._core.plan import Pass as Pass
from ._core.plan import PatchPlan as PatchPlan
from ._core.plan import PlanOutputs as PlanOutputs
from ._core.position_scores import EdgePositionScores as EdgePositionScores
from ._core.selection import LogitSelection as LogitSelection
from ._core.stability import CircuitStability as CircuitStability
from ._core.stability import circuit_stability as circuit_stability
from ._embedded import load_smollm2 as load_smollm2
from ._methods.ablation import mean_ablation_cache as mean_ablation_cache
from ._methods.ablation import zero_ablation_cache as zero_ablation_cache
from ._methods.activation import act_patch as act_patch
from ._methods.activation import plan_act_patch as plan_act_patch
from ._methods.attribution import attr_patch as attr_patch
from ._methods.circuit_discovery import confirm_edges as confirm_edges
from ._methods.circuit_discovery import exact_edge_scores as exact_edge_scores
from ._methods.circuit_evaluation import evaluate_circuit as evaluate_circuit
from ._methods.circuit_evaluation import plan_circuit_evaluation as plan_circuit_evaluation
from ._methods.confirmation import Confirmation as Confirmation
from ._methods.confirmation import ConfirmedCell as ConfirmedCell
from ._methods.confirmation import confirm as confirm
from ._methods.edge_paths import attr_path_patch as attr_path_patch
from ._methods.edges import attr_edges as attr_edges
from ._methods.faithfulness import MIB_FRACTIONS as MIB_FRACTIONS
from ._methods.faithfulness import FaithfulnessCurve as FaithfulnessCurve
from ._methods.faithfulness import MIBFaithfulness as MIBFaithfulness
from ._methods.faithfulness import faithfulness_curve as faithfulness_curve
from ._methods.faithfulness import mib_faithfulness as mib_faithfulness
from ._methods.learned_masks import learn_edge_masks as learn_edge_masks
from ._methods.path import path_patch as path_patch
from ._methods.path import plan_path_patch as plan_path_patch
from ._methods.path_confirmation import confirm_paths as confirm_paths
from ._tasks.task.loader import Task as Task
from ._tasks.task.loader import TaskRow as TaskRow
from ._tasks.task.loader import TaskTokens as TaskTokens
from ._tasks.task.loader import load_task as load_task
from ._tasks.task.loader import shipped_tasks as shipped_tasks
from .analysis import run_task as run_task
from .errors import PatchingError as PatchingError
from .ioi import IOIDataset as IOIDataset
from .ioi import IOISettings as IOISettings
from .ioi import example_prompts as example_prompts
from .ioi import run_ioi as run_ioi
from .ioi import write_report as write_report
from .metrics import Accuracy as Accuracy
from .metrics import AnswerLogProb as AnswerLogProb
from .metrics import KLDivergence as KLDivergence
from .metrics import LogitDiff as LogitDiff
from .metrics import LogitsAt as LogitsAt
from .metrics import NormalisedMetric as NormalisedMetric
from .metrics import PromptMean as PromptMean
from .metrics import SelectionMetric as SelectionMetric
from .metrics import TokenLogit as TokenLogit
from .metrics import TokenProbability as TokenProbability
from .metrics import calibrate as calibrate
from .metrics import denoising_metric as denoising_metric
from .metrics import faithfulness_target as faithfulness_target
from .metrics import lm_loss as lm_loss
from .metrics import logit_diff as logit_diff
from .metrics import noising_metric as noising_metric
from .plugin import CachePatchingMixin as CachePatchingMixin
from .plugin import PatchingMixin as PatchingMixin
from .plugin import install as install
from .plugin import load_plugins as load_plugins
from .results import PatchResult as PatchResult

__all__ = [
    # what to patch
    "Node",
    "IterNode",
    "SeqPos",
    # patching
    "act_patch",
    "path_patch",
    "attr_patch",
    "plan_act_patch",
    "plan_path_patch",
    "PatchPlan",
    "PlanOutputs",
    "Pass",
    "Block",
    "set_rank_timeout",
    "confirm",
    "confirm_paths",
    "Confirmation",
    "ConfirmedCell",
    # edge attribution and the edge graph
    "attr_edges",
    "attr_path_patch",
    "GraphNode",
    "Edge",
    "EdgeGraph",
    "EdgePositionScores",
    "EdgeScores",
    # circuits
    "Circuit",
    "evaluate_circuit",
    "plan_circuit_evaluation",
    "faithfulness_curve",
    "FaithfulnessCurve",
    "mib_faithfulness",
    "MIBFaithfulness",
    "MIB_FRACTIONS",
    "exact_edge_scores",
    "learn_edge_masks",
    "confirm_edges",
    "circuit_stability",
    "CircuitStability",
    "to_eap_ig_json",
    "eap_ig_scores",
    "eap_ig_circuit",
    "write_mib_submission",
    "read_mib_submission",
    "mean_ablation_cache",
    "zero_ablation_cache",
    # results and errors
    "PatchResult",
    "PatchingError",
    # metrics
    "LogitDiff",
    "KLDivergence",
    "AnswerLogProb",
    "Accuracy",
    "TokenLogit",
    "TokenProbability",
    "LogitsAt",
    "LogitSelection",
    "SelectionMetric",
    "NormalisedMetric",
    "PromptMean",
    "logit_diff",
    "lm_loss",
    "calibrate",
    "denoising_metric",
    "noising_metric",
    "faithfulness_target",
    # the TransformerLens plugin
    "PatchingMixin",
    "CachePatchingMixin",
    "install",
    "load_plugins",
    # tasks as data
    "Task",
    "TaskRow",
    "TaskTokens",
    "load_task",
    "shipped_tasks",
    "run_task",
    # the IOI task and the embedded model
    "IOIDataset",
    "IOISettings",
    "example_prompts",
    "run_ioi",
    "write_report",
    "load_smollm2",
    # public submodules
    "analysis",
    "ioi",
    "plots",
]

install()


def __getattr__(name: str):
    """`transformer_lens_patching.plots`, imported on first use (it needs plotly)."""
    if name == "plots":
        import importlib

        return importlib.import_module(".plots", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
