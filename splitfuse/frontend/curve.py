"""ZeroMQ CURVE for the frontend's TCP sockets: the clients' socket and the one where workers from
other machines join. Encrypted, and only peers whose public certificate is listed may connect."""
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


@dataclass(slots=True)
class CurveOptions:
    """This server's key pair and the peers it admits (certificates written by zmq.auth.create_certificates)."""
    server_secret_file: str   # this server's certificate with its secret key
    clients_dir: str          # the public certificates of the allowed peers

    def __post_init__(self) -> None:
        if not isinstance(self.server_secret_file, str) or not Path(self.server_secret_file).is_file():
            raise ValueError(f"CURVE needs the server's secret certificate file, got {self.server_secret_file!r}")
        if not isinstance(self.clients_dir, str) or not Path(self.clients_dir).is_dir():
            raise ValueError(f"CURVE needs a directory of the clients' public certificates, got {self.clients_dir!r}")


def curve_server(socket: zmq.Socket, curve: CurveOptions) -> ThreadAuthenticator:
    """Encrypt the socket (before it binds) with this server's keys; the authenticator, which serves its
    whole context, admits only the listed peers. Stop it when the socket closes."""
    authenticator = ThreadAuthenticator(socket.context)
    authenticator.start()
    authenticator.configure_curve(domain="*", location=str(Path(curve.clients_dir)))
    public, secret = zmq.auth.load_certificate(curve.server_secret_file)
    if secret is None:
        authenticator.stop()
        raise ValueError(f"{curve.server_secret_file} holds no secret key: give the server's secret certificate")
    socket.curve_secretkey, socket.curve_publickey, socket.curve_server = secret, public, True
    return authenticator
