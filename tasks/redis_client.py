"""Redis clients that ride out a Redis restart instead of failing the work in hand.

Every tideq process (worker, sweeper, producer) connects through `connect`. Commands that meet
a dropped connection or a refused connect are retried with exponential backoff by redis-py's
own `Retry` for up to `outage_s` seconds (a Redis restart with AOF takes a few seconds; a
failover tens). Past that the error reaches the caller, which must then leave the job to the
sweeper rather than record anything false.

Workers pass `max_connections`: the pool then blocks a thread that finds every connection in
use until one comes back, instead of raising MaxConnectionsError (redis-py's default pool
raises at its limit, which under hundreds of task threads lost jobs).
"""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

# Backoff between attempts: 50 ms doubling up to 2 s.
_BACKOFF_BASE_S = 0.05
_BACKOFF_CAP_S = 2.0
# How long a thread waits for a free pooled connection before giving up.
_POOL_WAIT_S = 60.0
# Seconds to wait for a connect and a reply; a reply taking longer means a dead server.
_SOCKET_TIMEOUT_S = 30.0
_CONNECT_TIMEOUT_S = 5.0

# Errors that mean "Redis is not there right now", as opposed to a bad command.
OUTAGE_ERRORS: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError)


def retry_policy(outage_s: float) -> Retry:
    """A Retry that keeps trying for about outage_s seconds."""
    # Attempts needed to cover outage_s with the capped backoff (the first ones are short).
    attempts, waited, delay = 0, 0.0, _BACKOFF_BASE_S
    while waited < outage_s:
        waited += min(delay, _BACKOFF_CAP_S)
        delay *= 2
        attempts += 1
    return Retry(ExponentialBackoff(cap=_BACKOFF_CAP_S, base=_BACKOFF_BASE_S), attempts,
                 supported_errors=OUTAGE_ERRORS)


def connect(url: str, outage_s: float = 60.0, max_connections: int | None = None,
            decode_responses: bool = False) -> redis.Redis:
    """A client for url whose commands are retried through an outage of up to outage_s.

    Args:
        max_connections: size the pool to the threads that share the client; a thread that
            finds all of them busy waits for one (BlockingConnectionPool). None: redis-py's
            default (non-blocking) pool, for single-threaded clients such as the producer.
    """
    options = {
        "retry": retry_policy(outage_s),
        "retry_on_error": list(OUTAGE_ERRORS),
        "socket_timeout": _SOCKET_TIMEOUT_S,
        "socket_connect_timeout": _CONNECT_TIMEOUT_S,
        "socket_keepalive": True,
        # Probe a connection idle this long before using it, so a connection that died with a
        # restarted server is replaced before a command is lost on it.
        "health_check_interval": 30,
        "decode_responses": decode_responses,
    }
    if max_connections is None:
        return redis.Redis.from_url(url, **options)
    pool = redis.BlockingConnectionPool.from_url(
        url, max_connections=max_connections, timeout=_POOL_WAIT_S, **options)
    return redis.Redis(connection_pool=pool)
