"""Exit 0 when TorchServe's /ping answers Healthy: the serve image's health check.

Docker's HEALTHCHECK (Dockerfile.serve) and the Kubernetes startup/readiness/liveness probes
(deploy/k8s/serve.yaml) both run this file from the image. It works with token authorization on
or off. On, it sends the inference key from key_file.json. Those keys expire
(token_expiration_min) and TorchServe never renews them by itself, so on a refused key it asks for
a new one with the API key, which does not expire, and pings again: without that a healthy server
would turn unhealthy (and, under Kubernetes, be restarted) once a day. Clients re-read the key
from key_file.json when they get a 400. The addresses come from TS_CONFIG_FILE unless
PROBE_PING_URL / PROBE_RENEW_URL say otherwise.
"""

import json
import os
import re
import sys
import urllib.error
import urllib.request


def address(key, default):
    """``key`` from the config TorchServe was started with (TS_CONFIG_FILE), as a loopback URL."""
    try:
        with open(os.environ["TS_CONFIG_FILE"]) as f:
            found = re.findall(rf"^\s*{key}\s*=\s*(\S+)\s*$", f.read(), re.M)
    except (KeyError, OSError):
        found = []
    return (found[-1] if found else default).replace("0.0.0.0", "127.0.0.1").rstrip("/")


KEY_FILE = os.environ.get("PROBE_KEY_FILE", "key_file.json")  # TorchServe writes it into its working directory
PING_URL = os.environ.get("PROBE_PING_URL") or address("inference_address", "http://127.0.0.1:8080") + "/ping"
RENEW_URL = (os.environ.get("PROBE_RENEW_URL")
             or address("management_address", "http://127.0.0.1:8081") + "/token?type=inference")


def keys():
    try:
        with open(KEY_FILE) as f:
            return json.load(f)
    except FileNotFoundError:
        return None  # token authorization is off


def get(url, key):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=4) as response:
        return response.read()


def main():
    found = keys()
    try:
        get(PING_URL, found and found["inference"]["key"])
        return 0
    except urllib.error.HTTPError as e:
        if found is None or e.code not in (400, 401):  # unhealthy, not a key problem
            print(f"ping: HTTP {e.code}: {e.read()[:200]!r}")
            return 1
    get(RENEW_URL, found["API"]["key"])
    get(PING_URL, keys()["inference"]["key"])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError, KeyError) as e:  # refused connection, timeout, odd key file
        print(f"ping: {type(e).__name__}: {e}")
        sys.exit(1)
