"""A local S3-compatible server (moto's server mode on 127.0.0.1, a port the OS picks) for the data tests and
bench/data.py. Sets dummy AWS credentials and S3_ENDPOINT_URL, which mosaicml-streaming's uploader and
downloader read, and creates the bucket."""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "S3_ENDPOINT_URL")


@contextlib.contextmanager
def local_s3(bucket: str) -> Iterator[str]:
    """Run the server, yield its endpoint URL; restores the environment afterwards. ImportError without moto."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    # port 0: the server binds a port the OS picks (one found free beforehand could be taken meanwhile)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://{}:{}".format(*server.get_host_and_port())
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", S3_ENDPOINT_URL=endpoint)
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
