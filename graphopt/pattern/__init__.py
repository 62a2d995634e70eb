"""Pattern rewriting: pattern DSL, matcher, rules, greedy driver, and `explain`.

    from graphopt.pattern import P, Rule, Fail, apply_rules

    x, w, c = P.any(), P.const(), P.const()
    mm = P.op("MatMul", x, w)
    root = P.op("Add", mm, c, commutative=True)
    rule = Rule("matmul-add-to-gemm", root,
                rewrite=lambda m, b: b.op.Gemm(m[x], m[w], m[c]),
                check=lambda m: m[x].shape is not None and len(m[x].shape) == 2 or Fail("x is not 2-D"))
    apply_rules(model, [rule], ctx)
"""

from graphopt.pattern.context import current_model, current_options, model_context
from graphopt.pattern.driver import RewriteError, Rewriter, RewritePass, apply_rules, drop_unused_initializers
from graphopt.pattern.explain import Candidate, explain, explain_candidates
from graphopt.pattern.matcher import Fail, Match, Matcher, MatchResult
from graphopt.pattern.pattern import (
    AnyPattern,
    ConstPattern,
    OpPattern,
    OptionalPattern,
    OrPattern,
    OutputPattern,
    P,
    Pattern,
    const_array,
)
from graphopt.pattern.rule import (
    PlanRule,
    RewriteBuilder,
    Rule,
    get_rule,
    list_rules,
    register_rule,
    unregister_rule,
)

__all__ = [
    "AnyPattern", "Candidate", "ConstPattern", "Fail", "Match", "MatchResult", "Matcher", "OpPattern",
    "OptionalPattern", "OrPattern", "OutputPattern", "P", "Pattern", "RewriteBuilder", "RewriteError",
    "PlanRule", "RewritePass", "Rewriter", "Rule", "current_model", "current_options", "model_context", "apply_rules", "drop_unused_initializers", "const_array", "explain", "explain_candidates", "get_rule",
    "list_rules", "register_rule", "unregister_rule",
]
