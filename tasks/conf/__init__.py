"""The `task` config group of evaluate.py (tasks/conf/task/*.yaml), beside the tasks' code: on
evaluate.py's search path only (conf/evaluate.yaml), so train.py neither lists nor accepts it."""
