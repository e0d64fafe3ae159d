"""SlimPajama's domains and the mixtures of them: presets, or explicit weights from config.

A mixture gives each domain its share of the training *tokens* (as the papers count them). The
pipeline turns token shares into document sampling rates with each domain's mean document length,
so a domain of long books is not over-represented just because its documents are long.

`data.mixture` spellings:
  ""                    SlimPajama's own proportions (the corpus as published)
  "slimpajama"          the same, by name
  "DC-1" ... "DC-6"     the SlimPajama-DC configurations (case-insensitive)
  "CommonCrawl:0.7,GitHub:0.3"   explicit weights; any positive numbers, normalized to sum to 1
"""

# Domain name -> the "redpajama_set_name" that marks it in SlimPajama's jsonl records.
DOMAINS = {
    "CommonCrawl": "RedPajamaCommonCrawl",
    "C4": "RedPajamaC4",
    "GitHub": "RedPajamaGithub",
    "Book": "RedPajamaBook",
    "ArXiv": "RedPajamaArXiv",
    "Wikipedia": "RedPajamaWikipedia",
    "StackExchange": "RedPajamaStackExchange",
}
DOMAIN_OF_SET_NAME = {v: k for k, v in DOMAINS.items()}

# Token shares of SlimPajama-627B by source, from the dataset card (cerebras/SlimPajama-627B).
SLIMPAJAMA = {"CommonCrawl": 52.2, "C4": 26.7, "GitHub": 5.2, "Book": 4.2, "ArXiv": 4.6,
              "Wikipedia": 3.8, "StackExchange": 3.3}

# SlimPajama-DC (Shen et al., arXiv 2309.10818): the six 330B-token combinations its 1.3B models
# were trained on. Source: Zeng et al. 2025 (arXiv 2504.12491), Appendix Table 3, which reproduces
# Shen et al.'s configuration table in percent (DC-4: CommonCrawl 75.8, Wikipedia 24.2; DC-5:
# CommonCrawl 75.8, GitHub 9.1, Book 7.9, Wikipedia 7.3). Every share of DC-1..DC-5 is a whole
# number of billions of the 330B budget, so they are written here in billions of tokens: exact,
# where the rounded percentages of DC-5 add up to 100.1. DC-6 is SlimPajama's own mix.
PRESETS = {
    "slimpajama": SLIMPAJAMA,
    "dc-1": {"CommonCrawl": 330},
    "dc-2": {"CommonCrawl": 300, "GitHub": 30},
    "dc-3": {"CommonCrawl": 250, "GitHub": 80},
    "dc-4": {"CommonCrawl": 250, "Wikipedia": 80},
    "dc-5": {"CommonCrawl": 250, "GitHub": 30, "Book": 26, "Wikipedia": 24},
    "dc-6": SLIMPAJAMA,
}


def parse(spec: str) -> dict[str, float]:
  """`data.mixture` -> {domain: weight > 0}, weights summing to 1, in `DOMAINS` order."""
  if spec.strip().lower() in PRESETS or not spec.strip():
    weights = PRESETS[spec.strip().lower() or "slimpajama"]
  else:
    weights = {}
    by_lower = {d.lower(): d for d in DOMAINS}
    for part in spec.split(","):
      name, sep, value = part.partition(":")
      domain = by_lower.get(name.strip().lower())
      try:
        weight = float(value) if sep else -1.0
      except ValueError:
        weight = -1.0
      if domain is None or weight < 0 or domain in weights:
        raise ValueError(
            f"bad data.mixture {spec!r} at {part!r}: give a preset ({', '.join(PRESETS)}) or "
            f"'domain:weight,...' with each domain once, from {', '.join(DOMAINS)}")
      weights[domain] = weight
  total = sum(weights.values())
  if total <= 0:
    raise ValueError(f"data.mixture {spec!r} gives every domain weight 0")
  return {d: weights[d] / total for d in DOMAINS if weights.get(d, 0) > 0}
