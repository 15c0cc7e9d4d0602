"""The training objectives, by name (a stage config's `task`). Adding one: a Task subclass in a file of its own here,
a line in TASKS, and its name with the sample format it trains on in pretrain/config.py's TASK_FORMATS."""
from pretrain.engine.tasks.base import Task, build_vision_tower, lockstep
from pretrain.engine.tasks.classification import ClassificationTask
from pretrain.engine.tasks.image_text import ImageTextModel, ImageTextTask

TASKS: dict[str, type[Task]] = {task.name: task for task in (ImageTextTask, ClassificationTask)}


def task_class(name: str) -> type[Task]:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name]


def build_task(cfg, world) -> Task:
    return task_class(cfg.task)(cfg, world)


__all__ = ["TASKS", "ClassificationTask", "ImageTextModel", "ImageTextTask", "Task", "build_task",
           "build_vision_tower", "lockstep", "task_class"]
