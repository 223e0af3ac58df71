"""The Celery app, configured from the deployment config ($TIDEQ_CONFIG or the defaults)."""

from __future__ import annotations

import click
from celery import Celery
from kombu import Exchange, Queue

from tasks import keys
from tasks.config import DeploymentConfig, load_config


def celery_settings(config: DeploymentConfig) -> dict[str, object]:
    """The Celery settings every tideq worker runs with; the reasons are in the README."""
    settings: dict[str, object] = {
        "broker_url": config.redis.url,
        # Ride out a Redis restart: reconnect for ever, and keep the running jobs running
        # (their results are stored once Redis answers again).
        "broker_connection_retry_on_startup": True,
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        # JSON only: pickle would let anyone who can write to Redis run code on the workers.
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        # Results go to tideq's own job records (tasks/store.py), not Celery's result backend.
        "task_ignore_result": True,
        "task_queues": [Queue(q, Exchange(q, type="direct"), routing_key=q) for q in keys.QUEUES],
        "task_default_queue": keys.QUEUE_LOW,
        "broker_transport_options": {
            # Consume high before low, in the order of -Q, instead of kombu's round robin.
            "queue_order_strategy": "priority",
            "visibility_timeout": config.redis.visibility_timeout_s,
            "unacked_restore_interval": config.redis.restore_interval_s,
            # Sweep at every interval (kombu's default scans only every 10th).
            "unacked_restore_throttle": 1,
            "unacked_mutex_expire": config.redis.restore_lock_expire_s,
            # Find a connection that died with a restarted server before using it.
            "health_check_interval": 10,
            "socket_keepalive": True,
            "retry_on_timeout": True,
        },
        # A job is acknowledged only once its result is stored (tasks/jobs.py); a lost
        # worker's jobs are redelivered by the sweeper (tasks/sweeper.py). Prefetch no more
        # than the threads can run, so a worker does not hoard low jobs while high ones wait.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # One process, one engine, num_workers task threads blocked on the engine's futures
        # (CUDA does not survive fork).
        "worker_pool": "threads",
        "worker_concurrency": config.num_workers,
        # Task events only while something watches: Flower turns them on at start-up and
        # keeps them on (its --enable_events, on by default). Sent unconditionally they cost
        # several Redis publishes per job: W-queue ran at 411 jobs/s with them, 530 without.
        "worker_send_task_events": False,
    }
    if config.redis.url.startswith("redis://"):
        # kombu's Redis transport, except that a message it cannot decode is dropped with a
        # log line instead of stopping the worker (tasks/transport.py). (rediss:// keeps
        # kombu's own, which sets up TLS from the scheme.)
        settings["broker_transport"] = "tasks.transport:Transport"
    return settings


def create_app(config: DeploymentConfig | None = None) -> Celery:
    config = config or load_config()
    celery_app = Celery("tideq")
    celery_app.conf.update(celery_settings(config))
    # `celery -A tasks worker --gpus 2,3`: this worker's GPU group (else TIDEQ_GPUS, else
    # CUDA_VISIBLE_DEVICES as inherited).
    celery_app.user_options["worker"].add(
        click.Option(["--gpus"], default=None, help="GPU ids of this worker's group, e.g. 2,3")
    )
    celery_app.tideq_config = config  # type: ignore[attr-defined]
    # Registers the task and the worker's start-up and shutdown hooks.
    from tasks import jobs, worker

    jobs.register(celery_app)
    worker.connect_signals(celery_app)
    return celery_app


app = create_app()
