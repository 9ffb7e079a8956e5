"""A real S3-compatible server on 127.0.0.1 for tests: moto's server mode in a child process.

A child process (not a thread in the test process) so that Ray workers, ``ray job submit`` jobs and the test
itself all reach it over HTTP exactly as they would reach S3, and so its request handling never competes with
the tests for the GIL.  With ``auth=True`` the server checks signatures against IAM users it holds: the fixture
creates one user with an allow-all policy and hands out its keys, so wrong keys are refused for real.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    access_key: str = "testing"
    secret_key: str = "testing"

    def client(self, access_key: str | None = None, secret_key: str | None = None):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=access_key or self.access_key,
                            aws_secret_access_key=secret_key or self.secret_key)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_s3_server(auth: bool = False, timeout: float = 30.0) -> S3Server:
    port = free_port()
    env = dict(os.environ, AWS_EC2_METADATA_DISABLED="true", MOTO_ALLOW_NONEXISTENT_REGION="false")
    if auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"      # the 3 IAM calls below, then every request is checked
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).read()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto server did not start on {endpoint}") from None
            time.sleep(0.1)
    server = S3Server(endpoint, process)
    if auth:
        import boto3

        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bootstrap",
                           aws_secret_access_key="bootstrap")
        iam.create_user(UserName="cap-dist")
        key = iam.create_access_key(UserName="cap-dist")["AccessKey"]
        iam.put_user_policy(UserName="cap-dist", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        server.access_key, server.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
    return server
