#!/usr/bin/env bash
# Rebuild assets/fonts/DejaVuSans-subset.ttf, the font the charts register with plotters
# so PNG text renders on machines without fonts. Source: Debian's fonts-dejavu-core
# (DejaVu Sans, Bitstream Vera license; see assets/fonts/LICENSE). The subset keeps Latin,
# Latin-1 and the few symbols the charts print, without hinting, to stay small; then
# scripts/pad_font_bearings.py works around plotters' glyph placement.
# Needs: apt-get install fonts-dejavu-core; pip install fonttools.
set -euo pipefail
cd "$(dirname "$0")/.."
src=${1:-/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf}
pyftsubset "$src" \
  --unicodes="U+0020-007E,U+00A0-00FF,U+0394,U+03BC,U+03C3,U+2013-2014,U+2016,U+2018-201D,U+2026,U+2190-2193,U+2212,U+221E,U+2248,U+2264-2265" \
  --no-hinting --layout-features='kern' --desubroutinize \
  --output-file=assets/fonts/DejaVuSans-subset.ttf
python3 scripts/pad_font_bearings.py assets/fonts/DejaVuSans-subset.ttf
ls -l assets/fonts/DejaVuSans-subset.ttf
