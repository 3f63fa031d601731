#!/usr/bin/env python3
"""Reference tokenisation for pali's PTB tokenizer: pycocoevalcap's own PTBTokenizer (Stanford
CoreNLP 3.4.1's Java PTBTokenizer, bundled with pycocoevalcap) on a large generated corpus.

    apt-get install default-jre-headless
    python3 -m venv /tmp/pyref && /tmp/pyref/bin/pip install pycocoevalcap==1.2
    /tmp/pyref/bin/python scripts/ptb_reference.py > tests/fixtures/eval/ptb.json

The corpus mixes every ASCII punctuation mark (alone, repeated, mixed, attached to either end of
a word), quotes, brackets, abbreviations and acronyms, numbers with points, commas, colons and
slashes, hyphens, apostrophes and contractions, URLs, e-mails, smileys and HTML entities, as
captions. pycocoevalcap tokenises a whole set of captions in one Java call (one caption per
line, so the lexer sees across line ends); so does this script, and the Rust test feeds the
same lines in the same order to `ptb::tokenize_lines`.

"corpora" are random caption sets (a prediction and five references per image, from the same
generator, predictions often near a reference) scored the way pycocoevalcap's COCOEvalCap does:
references and predictions tokenised in one call each, then BLEU-1..4 and CIDEr-D.
"""
import contextlib
import io
import json
import random
import string

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

rng = random.Random(20261202)

WORDS = ("a man woman dog cat the of on in with is are two three red blue big small "
         "sitting standing next to near street table pizza bus train sign park water "
         "people group child bike car field plate tree house road beach snow sky "
         "don't can't won't isn't it's that's they're we've i'm you'll she'd "
         "dog's cats' people's o'clock rock'n'roll y'all ma'am").split()
CAPS = ["A", "The", "Two", "Man", "Dogs", "I", "It", "This", "After", "However", "He", "She",
        "We", "You", "In", "At", "But", "Some", "There", "They", "About", "One"]
ABBREVS = ["Mr.", "Mrs.", "Ms.", "Dr.", "St.", "Jr.", "Sr.", "Prof.", "Inc.", "Ltd.", "Co.",
           "Corp.", "vs.", "etc.", "Mt.", "Ft.", "No.", "no.", "Jan.", "Feb.", "Aug.", "Sept.",
           "Oct.", "Nov.", "Dec.", "Calif.", "Mass.", "Ave.", "Rd.", "Blvd.", "Gov.", "Sen.",
           "Rep.", "Gen.", "Capt.", "Lt.", "al.", "fig.", "Fig.", "ca.", "approx.", "dept.",
           "Pty.", "pty.", "Bros.", "Ph.D.", "a.k.a.", "cf.", "e.g.", "i.e.", "a.m.", "p.m.",
           "U.S.", "U.K.", "U.S.A.", "N.Y.", "D.C.", "A.", "B.", "I.", "Z.", "x.", "Wash.",
           "Pa.", "tel.", "est.", "sq.", "art.", "op.", "nos.", "pp."]
NUMBERS = ["3", "10", "2.5", "3.50", "1,000", "10,000.50", "10:30", "3:45pm", "1/2", "3/4",
           "12/25/2019", "1-2", "2-3", "+5", "-3", "-2.5", "1990s", "'90s", "4th", "1st",
           "100%", "50%", "$5", "$3.50", "#1", "US$5", "1.2.3", "555-1234", "(555) 123-4567",
           "1 1/2", "0.5", ".5", "5.", "007", "2x4", "3x", "24/7", "9-11", "5'10", "6'2\""]
OTHER = ["http://example.com/a.jpg", "www.example.org", "foo.com", "mail@example.com",
         "@user", "#tag", ":)", ":-(", ";)", ":D", "=)", "<3", "^_^", "&amp;", "&quot;",
         "AT&T", "S&P", "R&D", "c++", "C#", "f#", "e-mail", "co-ed", "x-ray", "t-shirt",
         "hot-dog", "well-known", "state-of-the-art", "and/or", "w/", "b/w", "n/a",
         "A/C", "1/2-inch", "cannot", "gonna", "gotta", "wanna", "lemme", "gimme", "'twas",
         "'tis", "'em", "'cause", "'til", "c'mon", "ol'", "-LRB-", "-rrb-", "file.txt",
         "photo.jpg", "pro-", "anti-", "the '60s", "rock 'n' roll", "d'Arc", "O'Brien",
         "l'amour", "Dunkin'", "somethin'", "doin'", "y'know", "ain't", "shan't", "'s",
         "'re", "n't", "co.", "Co. Ltd", "Pty. Ltd", "<b>", "</b>", "<br/>", "&lt;", "&gt;",
         "&nbsp;", "&mdash;", "&#39;", "**", "***", "\\*", "__", "___", "@@", "##", "~",
         "^", "|", "\\", "=", "==", "+", "++", "&", "%", "`", "``", "''", "'", "\"",
         "<<", ">>", "<", ">", "[", "]", "{", "}", "(", ")", "(s)", "[sic]", "{x}"]
PUNCT = string.punctuation  # every ASCII punctuation mark
TAILS = ["", ".", "..", "...", "....", ".....", ". . .", ",", ".,", ",.", "!", "!!", "?",
         "?!", "!?", ";", ":", " .", " ,", " !", " ?", " ...", " -", " --", " ---", "-", "--",
         "---", "----", "'", "''", "\"", ")", "]", "}", ".)", ").", ".\"", "\".", "'.", ".'",
         "?\"", "!)", ":)", ";)", "...?", "?.", "!.", ",,", ";;", "::", ".!", "*", "/", "%"]


def word():
    r = rng.random()
    if r < 0.55:
        w = rng.choice(WORDS)
    elif r < 0.65:
        w = rng.choice(CAPS)
    elif r < 0.75:
        w = rng.choice(ABBREVS)
    elif r < 0.87:
        w = rng.choice(NUMBERS)
    else:
        w = rng.choice(OTHER)
    if rng.random() < 0.12:  # punctuation glued to the front
        w = rng.choice(PUNCT) * rng.choice([1, 1, 2]) + w
    if rng.random() < 0.15:  # or to the back
        w = w + rng.choice(PUNCT) * rng.choice([1, 1, 2, 3])
    return w


def sep():
    r = rng.random()
    if r < 0.85:
        return " "
    return rng.choice(["  ", "\t", " - ", " -- ", ", ", "; ", ": ", "/", "-", "'", " ' ",
                       " \" ", "(", ") ", "...", " & "])


def caption():
    n = rng.randint(1, 12)
    s = word()
    for _ in range(n - 1):
        s += sep() + word()
    s += rng.choice(TAILS)
    if rng.random() < 0.4:
        s = s[0].upper() + s[1:]
    return s


def punct_soup():
    """Pure punctuation and short fragments: every mark, in runs and mixtures."""
    n = rng.randint(1, 6)
    parts = []
    for _ in range(n):
        r = rng.random()
        if r < 0.5:
            parts.append("".join(rng.choice(PUNCT) for _ in range(rng.randint(1, 4))))
        elif r < 0.8:
            parts.append(rng.choice(WORDS))
        else:
            parts.append(rng.choice(NUMBERS + ABBREVS))
    glue = rng.choice(["", " ", " ", "  "])
    return glue.join(parts)


lines = []
for c in PUNCT:  # each mark alone, doubled, tripled, glued to words on either side
    lines += [c, c * 2, c * 3, f"a{c}", f"{c}a", f"a{c}b", f"a {c} b", f"the dog{c}", f"{c}the dog",
              f"A cat{c} The dog", f"3{c}5", f"U.S.{c}", f"etc{c}"]
for a in ABBREVS:  # each abbreviation before lower case, upper case, a digit, and at the end
    lines += [f"{a} the dog", f"{a} The dog", f"see {a} 5", f"a dog {a}", f"{a}, ok", f"{a}."]
lines += [caption() for _ in range(3000)]
lines += [punct_soup() for _ in range(1000)]
lines = [l for l in lines if l.strip()]  # pycocoevalcap gets no empty captions from COCO

# pycocoevalcap's own call: one caption per "image", all in one Java run, in this order.
tok = PTBTokenizer()
with contextlib.redirect_stdout(io.StringIO()):
    out = tok.tokenize({i: [{"caption": l}] for i, l in enumerate(lines)})


def near(ref):
    """A prediction close to a reference: a few words dropped, swapped or changed."""
    words = ref.split(" ")
    for _ in range(rng.randint(0, 3)):
        r, i = rng.random(), rng.randrange(len(words))
        if r < 0.3 and len(words) > 1:
            del words[i]
        elif r < 0.6:
            words[i] = word()
        else:
            j = rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
    return " ".join(words)


corpora = []
for _ in range(3):
    examples = []
    for i in range(150):
        refs = [caption() if rng.random() < 0.9 else punct_soup() for _ in range(5)]
        pred = near(rng.choice(refs)) if rng.random() < 0.7 else caption()
        examples.append({"prediction": pred, "references": refs})
    gts = {i: [{"caption": r} for r in e["references"]] for i, e in enumerate(examples)}
    res = {i: [{"caption": e["prediction"]}] for i, e in enumerate(examples)}
    with contextlib.redirect_stdout(io.StringIO()):
        gts_t, res_t = tok.tokenize(gts), tok.tokenize(res)
        bleu, _ = Bleu(4).compute_score(gts_t, res_t, verbose=0)
        cider, per = Cider().compute_score(gts_t, res_t)
    corpora.append({"examples": examples, "bleu": list(bleu), "cider": float(cider),
                    "cider_per_example": [float(x) for x in per]})

json.dump(
    {"about": "scripts/ptb_reference.py: pycocoevalcap 1.2 PTBTokenizer (CoreNLP 3.4.1)",
     "lines": lines, "tokens": [out[i][0] for i in range(len(lines))], "corpora": corpora},
    __import__("sys").stdout, indent=0, ensure_ascii=False)
