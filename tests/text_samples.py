"""Varied texts for tokenizer and normalisation checks (every paralinguistic tag appears)."""

TEXTS = [
    "Hello world.",
    "hello world",
    "  leading spaces keep the lowercase",
    "Oh, that's hilarious! [chuckle] Um anyway, we do have a new model in store.",
    "[laugh] Starting with a tag.",
    "Ending with a tag [sigh]",
    "Two tags [gasp][cough] back to back.",
    "[clear throat] Ahem. [sniff] [groan] [shush]",
    "Tone tags: [angry] no! [fear] what? [surprised] oh! [whispering] psst.",
    "[advertisement] Buy now. [dramatic] Then silence. [narration] Chapter two.",
    "[crying] I can't. [happy] I can! [sarcastic] Sure you can.",
    "Unknown [tag] stays text and [ laugh ] is not a tag.",
    "Ellipsis… and em—dash – en dash: colon “quotes” ‘single’.",
    "Numbers 1, 22, 333, 4444 and 3.14159 or 1,000,000.",
    "Mixed CASE Words, ALL CAPS, and camelCase identifiers.",
    "Tabs\tand\nnew\nlines\r\nand   many    spaces",
    "Ünïcödé: café, naïve, coöperate, résumé, São Paulo.",
    "Emoji 🙂 and symbols © ® ™ € £ ¥.",
    "Chinese 你好 and Japanese こんにちは in English text.",
    "URL https://example.com/path?q=1&x=2 and email a.b@example.org",
    "Apostrophes: don't, won't, it's, y'all, rock 'n' roll.",
    "Question? Exclamation! Both?! Ending with comma,",
    "Ends with a dash -",
    "Parentheses (like this) and [brackets] and {braces}.",
    "A very long sentence that keeps going and going, with clauses, sub-clauses; semicolons; and more words "
    "than anyone would normally say in one breath, just to see how the tokenizer copes with length.",
    "x",
    "Math: 2+2=4, 10% off, a*b/c, x^2 <= y.",
    "Code-like `snake_case` and __dunder__ names.",
    " ,comma after space",
    "[laugh][chuckle][sigh][gasp][cough][clear throat][sniff][groan][shush][whispering]",
]

# Plain sentences that make several-chunk requests in the Serve tests.
SENTENCES = [
    "The lighthouse keeper climbed the stairs before dawn.",
    "Gulls wheeled over the harbour, loud and hungry.",
    "She wrote the weather in a small green notebook.",
    "Nobody had asked her to, but somebody should.",
    "By noon the fog had lifted from the bay.",
]
