"""The paper's claims as pytest, runnable on anyone's checkpoints::

    pytest --pyargs probes.claims --mi-results results            # a compare/demo folder
    pytest --pyargs probes.claims --mi-base smollm2-135m-instruct \\
        --mi-variant sft=runs/sft --mi-variant grpo=runs/grpo --mi-variant sft-frozen=runs/sft-frozen

With ``--mi-results DIR`` holding a compare folder the stored results are read (no model loads);
otherwise ``compare`` runs first (into DIR when given, else a temporary folder; ``--mi-preset``
chooses its size). Each claim is one test; a failing claim's message states the measured numbers.
A claim that cannot be measured on the given models (no frozen run, say) is skipped with the
reason. The verdicts are the same functions the report uses (:mod:`mechinterp.claims`).
"""
