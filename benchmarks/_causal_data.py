"""Shared benchmark items for the causal techniques (clinical facts and counterfactual pairs)."""

from __future__ import annotations

FACTS = [
    ("Metformin is a first-line treatment for", " type 2 diabetes"),
    ("Atorvastatin is prescribed to lower", " cholesterol"),
    ("Insulin is a hormone produced by the", " pancreas"),
    ("Aspirin inhibits the enzyme", " cyclooxygenase"),
    ("A heart attack is also called a myocardial", " infarction"),
    ("The kidneys filter waste from the", " blood"),
    ("Asthma is a chronic disease of the", " airways"),
    ("Levothyroxine is used to treat an underactive", " thyroid"),
    ("The capital of France is", " Paris"),
    ("A dog is a kind of", " animal"),
    ("Water freezes at zero degrees", " Celsius"),
    ("The largest planet in the solar system is", " Jupiter"),
    ("Warfarin is an oral", " anticoagulant"),
    ("Amoxicillin is an antibiotic of the penicillin", " class"),
    ("Parkinson disease affects the", " brain"),
    ("Hypertension means high blood", " pressure"),
]

DRUGS = [
    ("metformin", " diabetes"),
    ("insulin", " diabetes"),
    ("warfarin", " thrombosis"),
    ("aspirin", " pain"),
    ("salbutamol", " asthma"),
    ("levothyroxine", " hypothyroidism"),
    ("amoxicillin", " infection"),
    ("omeprazole", " reflux"),
    ("atorvastatin", " cholesterol"),
    ("lisinopril", " hypertension"),
    ("sertraline", " depression"),
    ("ibuprofen", " inflammation"),
]
TEMPLATES = [
    "The doctor prescribed {c} because the patient has",
    "A patient taking {c} is most likely being treated for",
    "{c} is commonly used to treat",
]


def pairs(tokenizer, n: int) -> dict[str, list]:
    """``n`` counterfactual pairs (two drugs, one template) of equal token length."""
    out = {
        k: []
        for k in (
            "clean_prompts",
            "corrupt_prompts",
            "clean_targets",
            "corrupt_targets",
            "concept_spans",
        )
    }
    cands = []
    for t in TEMPLATES:
        for a, ta in DRUGS:
            for b, tb in DRUGS:
                if a == b or ta == tb:
                    continue
                pa, pb = t.format(c=a), t.format(c=b)
                if len(tokenizer(pa).input_ids) == len(tokenizer(pb).input_ids):
                    s = t.index("{c}")
                    cands.append((pa, pb, ta, tb, ((s, s + len(a)), (s, s + len(b)))))
    if len(cands) < n:
        cands = cands * (n // max(1, len(cands)) + 1)
    for pa, pb, ta, tb, sp in cands[:n]:
        out["clean_prompts"].append(pa)
        out["corrupt_prompts"].append(pb)
        out["clean_targets"].append(ta)
        out["corrupt_targets"].append(tb)
        out["concept_spans"].append(sp)
    return out
