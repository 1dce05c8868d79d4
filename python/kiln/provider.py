"""Mailbox providers: the table kiln ships (docs/providers.md).

A plan's `providers` section extends or overrides these. Domain lookup at run time (static
domains first, then the MX rollup) arrives with the daemon.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_PROVIDER", "DEFAULT_PROVIDERS", "ProviderDef"]

#: The provider of every domain that matches no other.
DEFAULT_PROVIDER = "default"


@dataclass(frozen=True, slots=True)
class ProviderDef:
    """Recipient domains and MX host suffixes that identify one mailbox provider."""

    domains: tuple[str, ...] = ()
    mx_suffixes: tuple[str, ...] = ()


DEFAULT_PROVIDERS: dict[str, ProviderDef] = {
    "google": ProviderDef(
        domains=("gmail.com", "googlemail.com"),
        mx_suffixes=(".google.com", ".googlemail.com", ".smtp.goog"),
    ),
    "microsoft-consumer": ProviderDef(
        domains=("hotmail.com", "outlook.com", "live.com", "msn.com"),
        mx_suffixes=(".olc.protection.outlook.com",),
    ),
    "microsoft-365": ProviderDef(mx_suffixes=(".mail.protection.outlook.com", ".mx.microsoft")),
    "yahoo": ProviderDef(
        domains=("yahoo.com", "aol.com", "ymail.com", "rocketmail.com"),
        mx_suffixes=(".yahoodns.net",),
    ),
    "yahoo-jp": ProviderDef(domains=("yahoo.co.jp",)),
    "apple": ProviderDef(domains=("icloud.com", "me.com", "mac.com"), mx_suffixes=(".icloud.com",)),
    "gmx-webde": ProviderDef(
        domains=("gmx.net", "gmx.de", "web.de", "mail.com"), mx_suffixes=(".gmx.net", ".web.de")
    ),
    "orange": ProviderDef(domains=("orange.fr", "wanadoo.fr"), mx_suffixes=(".orange.fr",)),
    "comcast": ProviderDef(domains=("comcast.net",), mx_suffixes=(".comcast.net",)),
    "mimecast": ProviderDef(
        mx_suffixes=(".mimecast.com", ".mimecast.co.za", ".mimecast-offshore.com")
    ),
    "qq": ProviderDef(domains=("qq.com", "foxmail.com"), mx_suffixes=(".qq.com",)),
    "netease-163": ProviderDef(domains=("163.com", "126.com"), mx_suffixes=(".netease.com",)),
}
