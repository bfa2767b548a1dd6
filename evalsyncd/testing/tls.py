"""TLS on loopback for tests: a throwaway certificate authority, and a proxy that
terminates TLS in front of a plain-HTTP server (SeaweedFS, fake-gcs-server), so the
``https://`` code paths of clients meet a real handshake.

    certs = LoopbackCertificates.create(tmp_path)       # CA + certificate for 127.0.0.1
    with TlsProxy("127.0.0.1", server_port, certs) as proxy:
        # proxy.url == "https://127.0.0.1:{port}"; trust it with AWS_CA_BUNDLE=certs.ca_file
        client_talks_to(proxy.url)

The certificates are made in process with the ``cryptography`` package (a dependency
of ``gcloud-aio-auth``, so installed with evalsyncd): an ECDSA P-256 CA, and a server
certificate it signs for the names and addresses asked (``127.0.0.1``, ``::1`` and
``localhost`` by default; IP addresses go in ``subjectAltName`` as IP entries, which
is what a client's hostname check of an IP address compares). Valid for one day from
a minute ago. Made in about 3 ms (after the first import).
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from evalsyncd.testing.proxy import CountingProxy

__all__ = ["LoopbackCertificates", "TlsProxy"]

_HOSTS = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class LoopbackCertificates:
    """PEM files of a throwaway CA and of a server certificate it signed.

    Attributes:
        ca_file: the CA's certificate: what a client trusts (``AWS_CA_BUNDLE``, ``cafile=``).
        cert_file: the server's certificate.
        key_file: the server's private key (unencrypted).
    """

    ca_file: Path
    cert_file: Path
    key_file: Path

    @classmethod
    def create(cls, directory: Path, hosts: Sequence[str] = _HOSTS) -> LoopbackCertificates:
        """Make a CA and a server certificate for ``hosts`` in ``directory`` (created).

        Args:
            directory: where ``ca.pem``, ``server.pem`` and ``server-key.pem`` are written.
            hosts: DNS names and IP addresses the server certificate is valid for.

        Raises:
            ImportError: the ``cryptography`` package is not installed.
        """
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "evalsyncd test CA")])
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca = (
            x509.CertificateBuilder()
            .subject_name(ca_name)
            .issuer_name(ca_name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ca_ski, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        made = cls(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
        made.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        made.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        made.key_file.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return made

    def server_context(self) -> ssl.SSLContext:
        """A server-side TLS context presenting the server certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


class TlsProxy(CountingProxy):
    """A :class:`~evalsyncd.testing.proxy.CountingProxy` whose listener speaks TLS with
    ``certificates``' server certificate: ``https://127.0.0.1:{port}`` in front of a
    plain-HTTP ``target_host:target_port``. It counts, delays and records (``record_heads``)
    the HTTP inside TLS. A client that does not trust the CA fails its handshake; the
    proxy then closes that connection and forwards nothing.

    Args:
        target_host: the server's address.
        target_port: the server's port.
        certificates: the server certificate and key (:meth:`LoopbackCertificates.create`).
        one_way_s: added delay per direction, seconds (0 for none).
        record_heads: keep every request's line and headers in :attr:`heads`.
    """

    thread_name = "loopback-tls-proxy"

    def __init__(
        self,
        target_host: str,
        target_port: int,
        certificates: LoopbackCertificates,
        *,
        one_way_s: float = 0.0,
        record_heads: bool = False,
    ) -> None:
        super().__init__(target_host, target_port, one_way_s=one_way_s, record_heads=record_heads)
        self.certificates = certificates
        self.server_ssl = certificates.server_context()
