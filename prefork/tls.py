"""TLS: the server's contexts, made from the settings, and the option parsers.

The master makes the contexts once, before it forks: every worker then holds
the same session-ticket keys, so a session a client resumes finds them on
whichever worker accepts it. A HUP makes them again from the files (that is
how a certificate is rotated); if they no longer load, the reload fails as a
whole and the running workers keep the contexts they have.

Errors are one line: a bad value (``ConfigError``, exit 2) names the option;
a file that cannot be read, or a key that does not match its certificate
(``TLSFileError``, exit 1), names the file.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from prefork.errors import ConfigError, PreforkError

TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
VERIFY_MODES = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}
# A client that has not finished its handshake by then is closed (--tls-handshake-timeout).
DEFAULT_HANDSHAKE_TIMEOUT = 10.0


class TLSFileError(PreforkError):
    """A certificate, key or CA file cannot be read or does not fit."""


@dataclass(frozen=True)
class SniCertificate:
    """``--sni NAME=CERTFILE[,KEYFILE]``: the certificate for one server name
    (``*.example.com`` matches one label in front of example.com)."""

    name: str
    certfile: str
    keyfile: str | None = None

    def __str__(self) -> str:
        key = f",{self.keyfile}" if self.keyfile else ""
        return f"{self.name}={self.certfile}{key}"


# -- option parsers (prefork.settings' table uses them) -------------------------------


def parse_tls_version(text: str, option: str) -> str:
    if text not in TLS_VERSIONS:
        raise ConfigError(f"{option}: expected 1.2 or 1.3, got {text!r}")
    return text


def parse_verify(text: str, option: str) -> str:
    if text not in VERIFY_MODES:
        raise ConfigError(f"{option}: expected none, optional or required, got {text!r}")
    return text


def parse_ciphers(text: str, option: str) -> str:
    """An OpenSSL cipher list (TLS 1.2; TLS 1.3's suites are OpenSSL's
    defaults), checked against this OpenSSL now rather than at start."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(text)
    except ssl.SSLError:
        raise ConfigError(f"{option}: no cipher this OpenSSL knows matches {text!r}") from None
    return text


def parse_alpn(text: str, option: str) -> tuple[str, ...]:
    """Protocol names, most preferred first: each 1 to 255 bytes of ASCII."""
    names = tuple(name.strip() for name in text.split(","))
    for name in names:
        if not name or not name.isascii() or len(name) > 255 or not name.isprintable():
            raise ConfigError(
                f"{option}: expected protocol names such as h2,http/1.1, got {text!r}"
            )
    return names


def parse_sni(text: str, option: str) -> SniCertificate:
    name, sep, files = text.partition("=")
    certfile, _, keyfile = files.partition(",")
    name = name.strip().lower().rstrip(".")
    label_ok = all(part and len(part) <= 63 for part in name.removeprefix("*.").split("."))
    if not sep or not certfile or not name or not name.isascii() or not label_ok:
        raise ConfigError(
            f"{option}: expected NAME=CERTFILE or NAME=CERTFILE,KEYFILE, got {text!r}"
        )
    return SniCertificate(name, certfile, keyfile or None)


# -- contexts -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSSettings:
    """What the contexts are made of (``Config``'s TLS fields)."""

    certfile: str
    keyfile: str | None = None
    ca_certs: str | None = None
    verify_client: str = "none"
    min_version: str = "1.2"
    ciphers: str | None = None
    alpn: tuple[str, ...] = ()
    sni: tuple[SniCertificate, ...] = ()

    @classmethod
    def of(cls, config: Any) -> TLSSettings | None:
        """From a ``Config``; None without ``--certfile``."""
        if config.certfile is None:
            return None
        return cls(
            config.certfile,
            config.keyfile,
            config.ca_certs,
            config.verify_client,
            config.tls_min_version,
            config.ciphers,
            config.alpn or (),
            config.sni or (),
        )


def check_tls_options(config: Any) -> None:
    """What one option says about another (ConfigError, exit 2)."""
    tls_binds = [str(a) for a in config.binds if a.tls]
    if config.certfile is None:
        for option, value in (
            ("--keyfile", config.keyfile),
            ("--ca-certs", config.ca_certs),
            ("--sni", config.sni),
            ("--alpn", config.alpn),
            ("--ciphers", config.ciphers),
        ):
            if value:
                raise ConfigError(f"{option} needs --certfile (the server's certificate)")
        if tls_binds:
            raise ConfigError(f"-b {tls_binds[0]} needs --certfile (the server's certificate)")
    if config.verify_client != "none" and config.ca_certs is None:
        raise ConfigError(
            f"--verify-client {config.verify_client} needs --ca-certs (the CAs that sign "
            "client certificates)"
        )


def check_tls_fit(
    worker_class: str,
    secured: str | None,
    datagram: str | None,
    builtin: bool = True,
    sni: bool = False,
) -> None:
    """The event worker serves the built-in services over TLS in its loop,
    UDP beside them; but a protocol, or --sni, gets TLS from Python protocols
    on the loop, which then serves protocols only, and the built-in UDP
    services need its built-in mode: one server cannot have both yet
    (ConfigError, exit 2)."""
    python_path = not builtin or sni
    if worker_class == "event" and secured and datagram and python_path:
        raise ConfigError(
            f"-k event cannot serve a TLS listener ({secured}) with --sni and a UDP one "
            f"({datagram}) in one server yet: run two servers, or use -k asyncio"
        )


def _load_chain(context: ssl.SSLContext, certfile: str, keyfile: str | None, what: str) -> None:
    try:
        context.load_cert_chain(certfile, keyfile)
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            if "KEY_VALUES_MISMATCH" in str(exc):
                raise TLSFileError(
                    f"{what} {keyfile or certfile} is not the key of {certfile}"
                ) from None
            raise TLSFileError(
                f"{what} {certfile}: not a PEM certificate chain and private key "
                f"({exc.reason or exc})"
            ) from None
        missing = exc.filename or (keyfile if keyfile else certfile)
        raise TLSFileError(f"{what} {missing}: cannot read: {exc.strerror}") from None


def _base_context(settings: TLSSettings) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = TLS_VERSIONS[settings.min_version]
    # A client may not renegotiate: each renegotiation costs the server a
    # handshake, at the client's pace (CVE-2011-1473).
    context.options |= ssl.OP_NO_RENEGOTIATION
    # A client that ends with a TCP end of file and no close_notify (most
    # line clients, `prefork client` at the end of its input) ends its input
    # there: without this OpenSSL 3 answers with a decode_error alert, which
    # the client reads as a failure after a complete exchange.
    context.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    if settings.ciphers:
        context.set_ciphers(settings.ciphers)
    if settings.alpn:
        context.set_alpn_protocols(list(settings.alpn))
    context.verify_mode = VERIFY_MODES[settings.verify_client]
    if settings.ca_certs is not None:
        try:
            context.load_verify_locations(cafile=settings.ca_certs)
        except ssl.SSLError as exc:
            raise TLSFileError(
                f"--ca-certs {settings.ca_certs}: no PEM certificate in it ({exc.reason or exc})"
            ) from None
        except OSError as exc:
            raise TLSFileError(
                f"--ca-certs {settings.ca_certs}: cannot read: {exc.strerror}"
            ) from None
    return context


def server_context(settings: TLSSettings) -> ssl.SSLContext:
    """The context every TLS listener serves with (raises TLSFileError).

    With ``--sni``, a client that names one of its names gets that
    certificate; any other name, or none, gets ``--certfile``'s."""
    context = _base_context(settings)
    _load_chain(context, settings.certfile, settings.keyfile, "--certfile")
    if settings.sni:
        by_name: dict[str, ssl.SSLContext] = {}
        for entry in settings.sni:
            named = _base_context(settings)
            _load_chain(named, entry.certfile, entry.keyfile, f"--sni {entry.name}:")
            by_name[entry.name] = named

        def pick(sslobj: Any, name: str | None, _: ssl.SSLContext) -> None:
            if name:
                name = name.lower().rstrip(".")
                chosen = by_name.get(name)
                if chosen is None and "." in name:
                    chosen = by_name.get("*." + name.split(".", 1)[1])
                if chosen is not None:
                    sslobj.context = chosen

        context.sni_callback = pick
    return context


def context_of(config: Any) -> ssl.SSLContext | None:
    """The context for ``config``'s TLS listeners, or None without TLS."""
    settings = TLSSettings.of(config)
    return None if settings is None else server_context(settings)


def describe_tls(sslobj: Any) -> dict[str, Any]:
    """What ``get_extra_info`` answers about a TLS connection, as asyncio's
    transports do: ``ssl_object``, ``peercert``, ``cipher``, ``compression``,
    ``selected_alpn_protocol``."""
    return {
        "ssl_object": sslobj,
        "sslcontext": sslobj.context,
        "peercert": sslobj.getpeercert(),
        "cipher": sslobj.cipher(),
        "compression": sslobj.compression(),
        "selected_alpn_protocol": sslobj.selected_alpn_protocol(),
    }
