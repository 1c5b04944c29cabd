"""The client TLS context of the MQTT transport, built from ``mqtt.tls``."""

from __future__ import annotations

import ssl

from agent.errors import ConfigError
from agent.transport.config import TlsConfig


def build_ssl_context(tls: TlsConfig | None) -> ssl.SSLContext:
    """A client TLS context: TLS 1.2 or later, the chain and the host name verified.

    ``tls=None`` (``mqtts://`` without a ``tls`` section) trusts the system CAs.
    ``insecure`` skips only the host name check.

    Raises:
        ConfigError: a file under ``tls`` is missing or is not PEM, or the certificate and
            key do not match; the message names the field.
    """
    tls = tls or TlsConfig()
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(tls, name)
        if path is not None and not path.is_file():
            raise ConfigError(f"mqtt.tls.{name}: {path} does not exist or is not a file")
    try:
        ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    except (ssl.SSLError, OSError) as exc:
        message = f"mqtt.tls.ca_file: {tls.ca_file} is not a PEM CA bundle ({exc})"
        raise ConfigError(message) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert_file is not None and tls.key_file is not None:
        try:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (ssl.SSLError, OSError) as exc:
            message = (
                f"mqtt.tls.cert_file/key_file: {tls.cert_file} and {tls.key_file} are not "
                f"a matching PEM certificate and key ({exc})"
            )
            raise ConfigError(message) from None
    if tls.insecure:
        ctx.check_hostname = False
    return ctx
