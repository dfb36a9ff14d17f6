"""The README and docs/*.md: every relative link and image points to a file that exists, every #anchor to a heading
of its page, and the README stays a short page for users. Plain text parsing, no network."""

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 300

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
INLINE_CODE = re.compile(r"(`+)(?:(?!\n[ \t]*\n).)*?\1", re.DOTALL)  # a code span, within one paragraph
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+[\"'(][^)]*)?\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.IGNORECASE)  # http(s):, mailto:, ...


def prose_lines(text: str) -> list[str]:
    """The page's lines with fenced code blocks blanked (their '#' lines and brackets are code, not markdown)."""
    lines, fence = [], None
    for line in text.splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            lines.append("")
        elif fence is not None:
            if line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
                fence = None
            lines.append("")
        else:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text (no link targets, no markup), lowercased, every character
    but letters, digits, '_', '-' and spaces dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or image renders as its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LMN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings, with GitHub's -1, -2 suffixes for repeated headings."""
    seen: dict[str, int] = {}
    result = set()
    for line in prose_lines(page.read_text(encoding="utf-8")):
        if match := HEADING.match(line):
            base = slug(match.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every markdown link and image outside code; a link's text may wrap lines."""
    text = "\n".join(prose_lines(page.read_text(encoding="utf-8")))
    text = INLINE_CODE.sub(lambda m: re.sub(r"[^\n]", " ", m.group()), text)  # blanked, so offsets keep their lines
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in LINK.finditer(text)]


def test_the_helpers_follow_githubs_rules(tmp_path):
    assert slug('Two points: lean (the defaults) or accurate (`profile = "accurate"`)') == \
        "two-points-lean-the-defaults-or-accurate-profile--accurate"
    assert slug("2026-11 (earlier): the 8-round preset at lr 8e-3 to 3.2e-2, constant") == \
        "2026-11-earlier-the-8-round-preset-at-lr-8e-3-to-32e-2-constant"
    assert slug("Comparing methods: `safedlora compare`") == "comparing-methods-safedlora-compare"
    assert slug("A [linked](x.md) heading — with × and −") == "a-linked-heading--with--and-"
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n```bash\n# not a heading [x](missing.md)\n```\n\n## Title\n\n"
                    "See [a](other.md#title-1 \"t\"), `[b](code.md)` and ![c](img/c.png), and a [wrapped\n"
                    "link](d.md).\n")
    assert anchors(page) == {"title", "title-1"}
    assert links(page) == [(9, "other.md#title-1"), (9, "img/c.png"), (9, "d.md")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    problems = []
    for number, target in links(page):
        if not target or EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / unquote(path)).resolve() if path else page
        where = f"{page.relative_to(ROOT)}:{number}: {target}"
        if not file.exists():
            problems.append(f"{where}: no such file")
        elif anchor and file.suffix == ".md" and unquote(anchor).lower() not in anchors(file):
            problems.append(f"{where}: no heading with this anchor in {file.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)


def test_the_readme_is_a_short_page_for_users():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines; move details into docs/"
