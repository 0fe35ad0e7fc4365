"""The paper's claims as pytest, runnable on anyone's checkpoints::

    pytest --pyargs probes.claims --mi-results results            # a compare/demo folder
    pytest --pyargs probes.claims --mi-base smollm2-135m-instruct \\
        --mi-variant sft=runs/sft --mi-variant grpo=runs/grpo --mi-variant sft-frozen=runs/sft-frozen

With ``--mi-results DIR`` holding a compare folder the stored results are read (no model loads);
otherwise ``compare`` runs first (into DIR when given, else a temporary folder; ``--mi-preset``
chooses its size). Each claim is one test: ``held`` passes, ``not held`` fails, ``inconclusive``
is an expected failure (XFAIL, never a pass) and ``not measured`` (no frozen run, say) is skipped;
each message states the effect, its interval, the test, p (and Holm's p), the minimum detectable
effect and n. The verdicts are the same functions the report uses (:mod:`mechinterp.study.claims`).
"""
