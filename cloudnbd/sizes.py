"""Human sizes: parsing '20GB', '20GiB', '512M' and printing them back.

Meaning (stated in --help too): a plain number is bytes; KB, MB, GB, TB are SI powers of
1000; KiB, MiB, GiB, TiB are IEC powers of 1024; a bare K, M, G, T is IEC as in qemu-img
and dd. Rates (for --upload-limit) take the same suffixes, per second.
"""

from __future__ import annotations

import re

from cloudnbd.errors import UsageError

SIZE_HELP = ("sizes: plain bytes, or KB/MB/GB/TB = powers of 1000 (SI), "
             "KiB/MiB/GiB/TiB or K/M/G/T = powers of 1024 (IEC)")

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
    "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "PIB": 2**50,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str, what: str = "size") -> int:
    """Bytes meant by text; UsageError naming `what` if it is not a size."""
    match = _SIZE_RE.match(text)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise UsageError(f"malformed {what} {text!r}: expected e.g. 20GB, 20GiB or 512M "
                         f"({SIZE_HELP})")
    number = match.group(1)
    if "." in number:
        whole, frac = number.split(".")
        value = int(whole) * _UNITS[unit] + int(frac) * _UNITS[unit] // 10 ** len(frac)
    else:
        value = int(number) * _UNITS[unit]
    return value


def format_size(n: int) -> str:
    """n bytes in the largest IEC unit that keeps it readable, e.g. '20 GiB', '1.5 MiB'."""
    for unit, factor in (("EiB", 2**60), ("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30),
                         ("MiB", 2**20), ("KiB", 2**10)):
        if n >= factor:
            value = n / factor
            text = f"{value:.2f}".rstrip("0").rstrip(".")
            return f"{text} {unit}"
    return f"{n} B"
