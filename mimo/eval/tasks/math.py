"""Generic math: problems and reference answers come with the completions (for `mimo eval score`)."""

from mimo.errors import MimoError
from mimo.eval.grading import grade_math
from mimo.eval.tasks import Task, math_chat_prompt, math_raw_prompt


def _no_data():
    raise MimoError("the generic 'math' task has no data of its own: use `mimo eval score --task math` with "
                    "completions that carry 'problem' and 'answer'")


TASK = Task(
    name="math",
    description="any math problems: each completion line brings its problem and reference answer",
    load=_no_data,
    chat_prompt=math_chat_prompt,
    raw_prompt=math_raw_prompt,
    grade=lambda row, completion: grade_math(completion, str(row["answer"])),
)
