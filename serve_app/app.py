"""Builds the Serve application: Ingress -> TurboModel replicas -> Stitcher, and the Jobs consumer
(queued jobs -> TurboModel -> Stitcher).

    serve run serve_app.app:build_app model=tiny        # builder with typed args
    serve build serve_app.app:app -o serve_config.yaml  # `app`: the default application

No `from __future__ import annotations` here: Serve validates builder args against the annotation
of `build_app`'s parameter only when that annotation is a class, not a string.
"""

import ray
import torch
from ray import serve
from ray.serve import Application
from ray.serve.task_consumer import task_consumer

from serve_app.config import AppArgs
from serve_app.deployments.args import ingress_args, model_args
from serve_app.deployments.ingress import Ingress
from serve_app.deployments.jobs import Jobs
from serve_app.deployments.model import TurboModel
from serve_app.deployments.stitcher import Stitcher
from serve_app.jobs.broker import task_processor_config


def visible_gpus() -> float:
    """GPUs Ray reports; before Ray is started (`serve run module:builder`, `serve build`), torch's count."""
    if ray.is_initialized():
        return float(ray.cluster_resources().get("GPU", 0.0))
    return float(torch.cuda.device_count())


def replica_num_gpus(args: AppArgs, visible_gpus: float) -> float:
    """GPU share each model replica requests, given the GPUs the cluster reports at build time."""
    use_gpu = args.device == "cuda" or (args.device == "auto" and visible_gpus > 0)
    return args.num_gpus if use_gpu else 0.0


def build_app(args: AppArgs) -> Application:
    """Ingress -> TurboModel -> Stitcher, each bound with its one config object. A further deployment
    is bound here and passed to the deployment that calls it."""
    num_gpus = replica_num_gpus(args, visible_gpus())
    model = serve.deployment(TurboModel, **TurboModel.get_deployment_options(args, num_gpus)).bind(
        model_args(args)
    )
    stitcher = serve.deployment(Stitcher, **Stitcher.get_deployment_options(args)).bind(args.watermark)
    jobs = None
    if args.jobs.enabled:
        consumer = task_consumer(task_processor_config=task_processor_config(args.jobs))(Jobs)
        jobs = serve.deployment(consumer, **Jobs.get_deployment_options(args)).bind(
            model, stitcher, ingress_args(args, on_gpu=num_gpus > 0).for_jobs(), args.jobs
        )
    ingress_options = Ingress.get_deployment_options(args)
    return serve.deployment(Ingress, **ingress_options).bind(
        model, stitcher, jobs, ingress_args(args, on_gpu=num_gpus > 0)
    )


app = build_app(AppArgs())
