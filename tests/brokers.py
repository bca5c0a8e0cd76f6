"""Real brokers for tests: Mosquitto on a free loopback port, config written here."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 10.0) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


class Mosquitto:
    def __init__(self, workdir: Path, extra: str = "", listener: str | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        user = "user root\n" if os.geteuid() == 0 else ""
        listener = (
            listener if listener is not None else f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
        )
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            f"{user}persistence true\npersistence_location {self.dir}/\nautosave_interval 0\n"
            "max_queued_messages 100000\nmax_inflight_messages 100\nset_tcp_nodelay true\n"
            "log_dest stderr\nlog_type error\n"
            f"{listener.format(port=self.port)}{extra}"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        self.log = open(self.dir / "mosquitto.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=self.log, stderr=self.log)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: Mosquitto saves retained messages
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        self.log.close()

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto"

SITE_DIR = "/etc/mosquitto/devicerunner/"
DATA_DIR = "/var/lib/mosquitto/"
DEVICE_LISTENER = "listener 8883"
OPERATOR_LISTENER = "listener 8884"


def deployed_config(text: str, workdir: Path, device_port: int, operator_port: int) -> str:
    """deploy/mosquitto/mosquitto.conf as a test runs it: only its site values
    change (deploy/mosquitto/README.md lists them): the directory of its files,
    the persistence directory, the two listener ports (bound to loopback), and
    ``user mosquitto`` -> ``user root`` when the tests run as root (Mosquitto
    would drop to the mosquitto user, who cannot read the test's files)."""
    subs = [
        (SITE_DIR, f"{workdir}/"),
        (DATA_DIR, f"{workdir}/data/"),
        (f"\n{DEVICE_LISTENER}\n", f"\nlistener {device_port} 127.0.0.1\n"),
        (f"\n{OPERATOR_LISTENER}\n", f"\nlistener {operator_port} 127.0.0.1\n"),
    ]
    if os.geteuid() == 0:
        subs.append(("\nuser mosquitto\n", "\nuser root\n"))
    for old, new in subs:
        if old not in text:
            raise RuntimeError(f"deploy/mosquitto/mosquitto.conf: no {old.strip()!r} to substitute")
        text = text.replace(old, new)
    return text


class DeployedMosquitto:
    """Mosquitto with the shipped deploy/mosquitto files, unchanged but for
    the site values :func:`deployed_config` substitutes; certificates from
    make-certs.sh, operator passwords from mosquitto_passwd."""

    PASSWORDS = {"operator": "operator-pw", "rollout-controller": "rollout-pw"}

    def __init__(self, workdir: Path, devices: tuple[str, ...] = ()) -> None:
        self.dir = workdir
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        self.device_port = free_port()
        self.operator_port = free_port()
        for name in ("acl-devices", "acl-operators"):
            shutil.copyfile(DEPLOY / name, self.dir / name)
        conf = (DEPLOY / "mosquitto.conf").read_text()
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(deployed_config(conf, self.dir, self.device_port, self.operator_port))
        self.certs("ca")
        self.certs("broker", "localhost", "127.0.0.1")
        for dev in devices:
            self.certs("device", dev)
        for i, (user, pw) in enumerate(self.PASSWORDS.items()):
            flags = ["-c"] if i == 0 else []
            subprocess.run(
                ["mosquitto_passwd", *flags, "-b", str(self.dir / "passwd"), user, pw],
                check=True,
                capture_output=True,
            )
        self.proc: subprocess.Popen[bytes] | None = None

    def certs(self, *args: str) -> None:
        subprocess.run(["sh", str(DEPLOY / "make-certs.sh"), args[0], str(self.dir), *args[1:]], check=True)

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def device_cert(self, device_id: str) -> tuple[Path, Path]:
        return self.dir / "devices" / f"{device_id}.crt", self.dir / "devices" / f"{device_id}.key"

    def operator_url(self, user: str = "operator") -> str:
        return f"mqtts://{user}:{self.PASSWORDS[user]}@127.0.0.1:{self.operator_port}"

    @property
    def device_url(self) -> str:
        return f"mqtts://127.0.0.1:{self.device_port}"

    def start(self) -> DeployedMosquitto:
        self.log = open(self.dir / "mosquitto.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=self.log, stderr=self.log)
        wait_port(self.device_port)
        wait_port(self.operator_port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


CONSTRAINED = "retain_available false\nmax_packet_size 65536\nmessage_size_limit 65536\n"
"""Mosquitto made to behave like a constrained managed broker (Azure IoT Hub:
no RETAIN; Event Grid: 64 KB messages): retained publishes are refused."""

RABBITMQ_HOME = Path("/usr/lib/rabbitmq/lib")
EPMD = shutil.which("epmd") or "/usr/bin/epmd"


def rabbitmq_server() -> Path | None:
    """The rabbitmq-server script of the Debian package, if installed."""
    found = sorted(RABBITMQ_HOME.glob("rabbitmq_server-*/sbin/rabbitmq-server"))
    return found[-1] if found else None


class RabbitMQ:
    """RabbitMQ with its MQTT plugin on free loopback ports, everything in
    ``workdir`` (its own Erlang port mapper too, so nothing is left behind).
    Starting takes ~5-10 s: one per test module."""

    def __init__(self, workdir: Path) -> None:
        server = rabbitmq_server()
        if server is None:
            raise RuntimeError("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        self.server = server
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port, amqp, self.epmd_port, dist = (free_port() for _ in range(4))
        (self.dir / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{amqp}\n"
            f"mqtt.listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "mqtt.allow_anonymous = true\nlog.console = false\nlog.file.level = warning\n"
        )
        self.env = {
            **os.environ,
            "HOME": str(self.dir),
            "RABBITMQ_NODENAME": f"dr{self.port}@localhost",
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "RABBITMQ_DIST_PORT": str(dist),
            "ERL_EPMD_PORT": str(self.epmd_port),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> RabbitMQ:
        self.log = open(self.dir / "server.log", "ab")  # noqa: SIM115 - closed in stop()
        # our own port mapper, in the foreground, so stop() can end exactly it
        self.epmd = subprocess.Popen([EPMD, "-port", str(self.epmd_port)], stdout=self.log, stderr=self.log)
        self.proc = subprocess.Popen([str(self.server)], env=self.env, stdout=self.log, stderr=self.log)
        try:
            wait_port(self.port, timeout_s)
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for p in (self.proc, self.epmd):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        self.proc = self.epmd = None
        self.log.close()
