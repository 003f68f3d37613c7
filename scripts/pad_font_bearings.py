"""Give every glyph of a TrueType font a left bearing of zero in its outline bounds, so that
plotters 0.3.7's ab_glyph text drawing places glyphs right: it draws each glyph's bitmap at
the pen position and ignores the bitmap's left offset (the glyph's left side bearing), which
closes the gap before a glyph and opens one after it ("fp 32"). A zero-area contour at x = 0
stretches each glyph's bounds to the pen position without drawing anything.

Usage: python3 scripts/pad_font_bearings.py FONT.ttf   (rewrites it in place; needs fonttools)
"""

import sys

from fontTools.ttLib import TTFont
from fontTools.ttLib.tables import ttProgram

path = sys.argv[1]
font = TTFont(path)
glyf = font["glyf"]
for name in font.getGlyphOrder():
    glyph = glyf[name]
    if glyph.isComposite():
        glyph.expand(glyf)
        coords, ends, flags = glyph.getCoordinates(glyf)
        glyph.components = []
        glyph.numberOfContours = len(ends)
        glyph.coordinates, glyph.endPtsOfContours, glyph.flags = coords, list(ends), flags
        glyph.program = ttProgram.Program()
        glyph.program.fromBytecode(b"")
    if glyph.numberOfContours <= 0:
        continue
    glyph.recalcBounds(glyf)
    if glyph.xMin <= 0:
        continue
    y = glyph.yMin
    for _ in range(3):
        glyph.coordinates.append((0, y))
        glyph.flags.append(1)
    glyph.endPtsOfContours.append(len(glyph.coordinates) - 1)
    glyph.numberOfContours += 1
    glyph.recalcBounds(glyf)
    advance, _ = font["hmtx"][name]
    font["hmtx"][name] = (advance, glyph.xMin)
font.save(path)
