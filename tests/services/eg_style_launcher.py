"""A test stand-in for an Enterprise Gateway kernel launcher, written from EG's documented wire format.

It accepts EG's ``--RemoteProcessProxy.*`` arguments, runs ipykernel in-process, reports the
connection info as EG's version-1 payload (AES-ECB + RSA PKCS#1 v1.5, no launch token) and serves
EG's plain-JSON comm port (``{"signum": N}``), so the tests can show an EG kernelspec and image
working unchanged against our gateway. With ``--RemoteProcessProxy.spark-context-initialization-mode
eager`` (as EG's Spark kernelspecs pass it) it creates a SparkSession as ``spark`` before it reports.
Test-only: real EG images carry EG's own launcher.
"""

import argparse
import base64
import json
import os
import socket
import threading
import uuid

from cryptography.hazmat.primitives import padding as sym_padding
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.serialization import load_der_public_key


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("kernel-id", "response-address", "public-key", "port-range", "spark-context-initialization-mode"):
        parser.add_argument(f"--RemoteProcessProxy.{name}", dest=name.replace("-", "_"))
    args, _ = parser.parse_known_args()

    from ipykernel.kernelapp import IPKernelApp
    from traitlets.config import Config

    config = Config()
    config.Session.key = str(uuid.uuid4()).encode()
    config.IPKernelApp.ip = "0.0.0.0"
    app = IPKernelApp.instance(config=config)
    app.initialize([])
    if args.spark_context_initialization_mode == "eager":
        from pyspark.sql import SparkSession

        spark = SparkSession.builder.getOrCreate()
        app.kernel.shell.user_ns.update(spark=spark, sc=spark.sparkContext)

    comm = socket.socket()
    comm.bind(("0.0.0.0", 0))
    comm.listen(4)

    def serve() -> None:
        while True:
            conn, _ = comm.accept()
            with conn:
                data = b""
                while chunk := conn.recv(1024):
                    data += chunk
            request = json.loads(data or b"{}")
            if request.get("signum"):
                os.kill(os.getpid(), int(request["signum"]))

    threading.Thread(target=serve, daemon=True).start()
    host, port = args.response_address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as conn:
        info = {"shell_port": app.shell_port, "iopub_port": app.iopub_port, "stdin_port": app.stdin_port,
                "control_port": app.control_port, "hb_port": app.hb_port, "ip": conn.getsockname()[0],
                "key": config.Session.key.decode(), "transport": "tcp", "signature_scheme": "hmac-sha256",
                "kernel_name": "", "pid": os.getpid(), "pgid": os.getpgid(0), "comm_port": comm.getsockname()[1],
                "kernel_id": args.kernel_id}
        aes_key = os.urandom(16)
        padder = sym_padding.PKCS7(128).padder()
        encryptor = Cipher(algorithms.AES(aes_key), modes.ECB()).encryptor()
        conn_info = encryptor.update(padder.update(json.dumps(info).encode()) + padder.finalize()) + encryptor.finalize()
        rsa_key = load_der_public_key(base64.b64decode(args.public_key))
        envelope = {"version": 1, "key": base64.b64encode(rsa_key.encrypt(aes_key, padding.PKCS1v15())).decode(),
                    "conn_info": base64.b64encode(conn_info).decode()}
        conn.sendall(base64.b64encode(json.dumps(envelope).encode()))
    app.start()


if __name__ == "__main__":
    main()
