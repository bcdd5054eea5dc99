FLOW_NAME = "reflow"  # the Prefect flow's name (flows/reflow.py; deployments are `reflow/<name>`)
