"""Names and integer ids of the training objectives.

Every packed example in a batch belongs to exactly one task; the batch carries
the task of each example as `task_id [batch]` with the ids below.
"""

LM = "lm"
MLM = "mlm"
RTD = "rtd"
SOP = "sop"

TASK_NAMES = (LM, MLM, RTD, SOP)
TASK_IDS = {name: index for index, name in enumerate(TASK_NAMES)}

# Next-token examples attend causally; the others see the whole document.
BIDIRECTIONAL_TASKS = (MLM, RTD, SOP)
