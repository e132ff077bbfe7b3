#!/usr/bin/env bash
# Install everything the test suite needs on a fresh Debian machine: the Debian packages
# of the real NBD clients and tools, and the Python packages (cloudnbd itself, pytest,
# SeaweedFS and fake-gcs-server wrappers) into the project's virtual environment .venv,
# made with $PYTHON (default python3; contrib/venv.sh). Idempotent; run as root or with
# sudo. --python-only skips the Debian packages (`make test-unit` needs none).
#
# python3-libnbd is Debian's `nbd` module: nbdsh runs it with /usr/bin/python3, whatever
# interpreter the venv was made with.
set -euo pipefail
cd "$(dirname "$0")/.."

debs=(python3-venv libnbd-bin nbdfuse python3-libnbd qemu-utils fio nbdkit nbdkit-plugin-python
      btrfs-progs e2fsprogs fuse3 util-linux python3-boto3
      prometheus rpm man-db systemd  # promtool and a real scraper; rpmbuild; man; systemd-analyze
      s3backer curl)  # bench/run: a contender, and the raw reference on slow links
missing=()
[ "${1:-}" = --python-only ] && debs=()
for pkg in "${debs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if ((${#missing[@]})); then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
    # Debian's prometheus package starts a system-wide server on :9090; the tests start
    # their own on loopback, so keep the machine as it was.
    if [[ " ${missing[*]} " == *" prometheus "* ]] && [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now prometheus.service >/dev/null 2>&1 || true
    fi
fi

bash contrib/venv.sh .venv
# An editable install follows the source by itself: only a changed setup.py (dependencies,
# entry points) needs pip again, which otherwise costs 15 s of every `make test-unit`; or
# a plain install `make demo` made, which must not be what the tests import.
stamp=.venv/.installed-from
here="$PWD"
if [ "$(cat "$stamp" 2>/dev/null)" != "$(sha256sum setup.py)" ] ||
   ! (cd / && "$here/.venv/bin/python" -c "import cloudnbd, sys
sys.exit(cloudnbd.__file__ != '$here/cloudnbd/__init__.py')" 2>/dev/null); then
    .venv/bin/python -m pip install -q -e '.[test]'
    sha256sum setup.py > "$stamp"
fi
