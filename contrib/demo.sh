#!/usr/bin/env bash
# A demo volume on the local-directory backend: no cloud account needed.
# Creates ./demo/bucket/photos (a 1 GiB volume), serves it on 127.0.0.1:10809 and
# prints how to attach it. Stop it with the `cloudnbd close` line it prints. `make demo`
# runs it with the project's .venv/bin first on PATH; the lines it prints name the
# cloudnbd it used, so they work from a shell without that PATH too.
set -euo pipefail
cloudnbd="$(command -v cloudnbd)"
demo="${DEMO_DIR:-$PWD/demo}"
port="${DEMO_PORT:-10809}"
mkdir -p "$demo/bucket"   # the directory that plays the bucket must exist
password_file="$demo/password"
if [ ! -f "$password_file" ]; then
    (umask 077; head -c 24 /dev/urandom | base64 > "$password_file")
    echo "demo password written to $password_file (mode 0600)"
fi
volume="$demo/bucket/photos"
if [ ! -f "$volume/volume.json" ]; then
    cloudnbd init file "$volume" 1GiB --password-file "$password_file"
fi
cloudnbd info file "$volume" --password-file "$password_file"
cloudnbd open file "$volume" -p "$port" --cache "$demo/cache" --password-file "$password_file"
cat <<EOT

Try it:
  nbdinfo nbd://127.0.0.1:$port
  nbdcopy --flush some-disk-image.raw nbd://127.0.0.1:$port   # or format it: see README
Stop it (uploads everything first):
  $cloudnbd close file $volume --cache $demo/cache
EOT
