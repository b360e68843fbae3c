"""properlm's data layer: every input layout loaded into one in-memory form.

``load_dataset`` reads LaMP, OPPU, MovieLens and JSONL logs; ``inspect_path``
summarizes a path (streaming JSONL and LaMP files); ``generate`` makes
synthetic tasks with planted user groups; ``export_lamp`` writes LaMP's layout;
``split_users`` picks the stage-3 target users; ``get_task`` gives a task's
templates and metrics.
"""

from properlm.data.inspect import format_inspect, inspect_dataset, inspect_path
from properlm.data.lamp import export_lamp
from properlm.data.load import load_dataset, validate
from properlm.data.schema import Dataset, Item, Query, User
from properlm.data.splits import split_users
from properlm.data.synth import generate
from properlm.data.tasks import TASKS, Task, get_task

__all__ = [
    "Dataset", "Item", "Query", "User", "TASKS", "Task", "export_lamp", "format_inspect", "generate",
    "get_task", "inspect_dataset", "inspect_path", "load_dataset", "split_users", "validate",
]
