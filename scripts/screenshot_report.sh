#!/usr/bin/env bash
# Screenshot a report page (index.html or compare.html) in headless Chromium with the
# network off, to check that it renders offline and looks right.
#
# Usage: scripts/screenshot_report.sh PAGE.html [OUT.png] [WIDTH,HEIGHT]
#   default OUT: PAGE's name with .png; default size 1400,4200 (a tall window shows the
#   whole page in one picture).
# Needs Debian's chromium (apt-get install chromium). Not part of CI.
set -euo pipefail
page=${1:?usage: scripts/screenshot_report.sh PAGE.html [OUT.png] [WIDTH,HEIGHT]}
out=${2:-${page%.html}.png}
size=${3:-1400,4200}
[ -f "$page" ] || { echo "screenshot_report.sh: no such page: $page" >&2; exit 1; }
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "screenshot_report.sh: chromium not found, expected Debian's chromium package" >&2; exit 1; }
url="file://$(cd "$(dirname "$page")" && pwd)/$(basename "$page")"
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
args=(--headless --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$profile"
  --no-first-run --disable-extensions --disable-background-networking --disable-sync
  --proxy-server=127.0.0.1:9 --host-resolver-rules="MAP * ~NOTFOUND"
  --window-size="$size" --screenshot="$(realpath -m "$out")" "$url")
# A network namespace of its own takes the network away entirely, where permitted.
if command -v unshare >/dev/null 2>&1 && unshare -rn true 2>/dev/null; then
  unshare -rn "$browser" "${args[@]}" 2>/dev/null
else
  "$browser" "${args[@]}" 2>/dev/null
fi
echo "$out"
