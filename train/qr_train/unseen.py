"""The unseen-entity probe: held-out rows whose entity names are replaced by invented names
that never occur in the training data; the score is the share of those names that the model
writes back exactly (case-sensitive substring of its output)."""
from __future__ import annotations

from .corpus import Example
from .entities import NameFactory, find_mentions, substitute

# A seed range of its own, so probe names are not the names training invented.
PROBE_SEED_OFFSET = 1_000_003
# The seed of the probe whose figures the model card, README and notes quote.
PROBE_SEED = 7


def unseen_entity_set(held_out: list[Example], train: list[Example], seed: int, limit: int,
                      punctuated: bool = False) -> list[tuple[Example, list[str]]]:
    """With `punctuated`, every invented name has an apostrophe or hyphen inside a word
    ("Kea O'Thrommel"), the shape the model used to cut short ("Shaquille O")."""
    training_text = "\n".join(ex.query + "\n" + ex.target for ex in train).lower()
    names = NameFactory(seed + PROBE_SEED_OFFSET)
    invent = (lambda _like: names.punctuated()) if punctuated else names.invented
    out = []
    for ex in held_out:
        mentions = find_mentions(ex)
        if not mentions:
            continue
        mapping = {}
        for m in mentions:
            new = invent(m.name)
            while new.lower() in training_text:
                new = invent(m.name)
            mapping[m.name] = new
        swapped = substitute(ex, mapping)
        expected = [n for n in mapping.values() if n in swapped.target]
        if expected:
            out.append((swapped, expected))
        if len(out) >= limit:
            break
    return out


def copy_rate(probe: list[tuple[Example, list[str]]], predictions: list[str]) -> float:
    hits = total = 0
    for (_, names), text in zip(probe, predictions):
        for name in names:
            total += 1
            hits += name in text
    return hits / max(total, 1)


def main(argv=None) -> None:
    """Write a probe as labelled JSONL for `qclient eval`, or score `qclient eval --json` output:

        python -m qr_train.unseen write probe.jsonl [--punctuated]
        qclient eval probe.jsonl --json > eval.json
        python -m qr_train.unseen score probe.jsonl eval.json
    """
    import argparse
    import json

    from .corpus import DEFAULT_CORPUS, load_splits

    p = argparse.ArgumentParser(description=main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("out")
    w.add_argument("--punctuated", action="store_true")
    w.add_argument("--limit", type=int, default=300)
    w.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    sc = sub.add_parser("score")
    sc.add_argument("probe")
    sc.add_argument("eval_json")
    args = p.parse_args(argv)
    if args.cmd == "write":
        splits = load_splits(args.corpus)
        probe = unseen_entity_set(splits["test"], splits["train"], seed=PROBE_SEED, limit=args.limit,
                                  punctuated=args.punctuated)
        with open(args.out, "w") as f:
            for ex, names in probe:
                f.write(json.dumps({"query": ex.query, "subqueries": ex.target, "kind": "unseen", "names": names}) + "\n")
        print(f"{len(probe)} rows, {sum(len(n) for _, n in probe)} names -> {args.out}")
        return
    rows = [json.loads(line) for line in open(args.probe) if line.strip()]
    answered = {e["query"]: " | ".join(e["predicted"]) for e in json.load(open(args.eval_json))["examples"]}
    probe = [(Example(r["query"], (r["subqueries"],)), r["names"]) for r in rows]
    rate = copy_rate(probe, [answered.get(r["query"], "") for r in rows])
    total = sum(len(r["names"]) for r in rows)
    print(f"names copied: {round(rate * total)} of {total} ({rate:.1%})")


if __name__ == "__main__":
    main()
