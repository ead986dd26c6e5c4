"""Reads runs back from an MLflow server with MLflow's own Python client, as a researcher
would, and prints what it found as JSON for server/tests/mlflow.rs to check.

usage: readback.py TRACKING_URI LOCAL_RUN_ID [LOCAL_RUN_ID ...]
"""
import json
import sys

import mlflow
from mlflow import MlflowClient


def artifacts(client, run_id, path=None):
    out = []
    for a in client.list_artifacts(run_id, path):
        out.extend(artifacts(client, run_id, a.path) if a.is_dir else [[a.path, a.file_size]])
    return out


def main():
    uri, local_ids = sys.argv[1], sys.argv[2:]
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    found = {}
    for local in local_ids:
        frame = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`atelier.run_id` = '{local}'")
        copies = len(frame)
        if copies == 0:
            found[local] = {"copies": 0}
            continue
        run = client.get_run(frame.run_id[0])
        histories = {
            key: [[m.step, m.value, m.timestamp] for m in client.get_metric_history(run.info.run_id, key)]
            for key in run.data.metrics
        }
        found[local] = {
            "copies": copies,
            "run_id": run.info.run_id,
            "name": run.info.run_name,
            "status": run.info.status,
            "start_time": run.info.start_time,
            "end_time": run.info.end_time,
            "experiment": client.get_experiment(run.info.experiment_id).name,
            "params": run.data.params,
            "tags": run.data.tags,
            "histories": histories,
            "artifacts": artifacts(client, run.info.run_id),
        }
    registry = {}
    for model in client.search_registered_models():
        versions = client.search_model_versions(f"name='{model.name}'")
        registry[model.name] = {
            "aliases": dict(model.aliases),
            "versions": {
                v.version: {"run_id": v.run_id, "source": v.source, "tags": v.tags, "aliases": list(v.aliases)}
                for v in versions
            },
        }
    print(json.dumps({"runs": found, "registry": registry}))


if __name__ == "__main__":
    main()
