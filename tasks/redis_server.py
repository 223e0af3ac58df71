"""Start a local Redis server when none answers on the configured URL (demo and tests).

    python -m tasks.redis_server [URL]     # ensure one answers; prints what it did
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from urllib.parse import urlparse

import redis

# How long a freshly started server may take to answer.
_START_TIMEOUT_S = 10.0


class RedisUnavailableError(RuntimeError):
    pass


def answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False


def ensure_redis(url: str) -> subprocess.Popen[bytes] | None:
    """Return None if a server answers on url; else start one on its host/port (in-memory, no
    persistence) and return its process, which the caller stops when done."""
    if answers(url):
        return None
    parsed = urlparse(url)
    host = parsed.hostname or "127.0.0.1"
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise RedisUnavailableError(f"no Redis answers on {url}, and it is not a local address")
    binary = shutil.which("redis-server")
    if binary is None:
        raise RedisUnavailableError(
            f"no Redis answers on {url} and redis-server is not installed"
            " (Debian/Ubuntu: apt-get install redis-server)"
        )
    proc = subprocess.Popen(
        [binary, "--bind", host, "--port", str(parsed.port or 6379), "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if answers(url):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RedisUnavailableError(f"started redis-server for {url}, but it does not answer")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    url = args[0] if args else "redis://127.0.0.1:6379/0"
    try:
        proc = ensure_redis(url)
    except RedisUnavailableError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if proc is None:
        print(f"redis answers on {url}")
    else:
        # Leave it running for the commands that follow (CI, a test run).
        print(f"started redis-server (pid {proc.pid}) for {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
