"""lm-evaluation-harness model type ``slimlm``: evaluate any slimlm model or artifact with lm-eval.

lm-eval discovers models through its registry, which has no plugin entry point, so this module
registers ``slimlm`` on import; run lm-eval through it:

    python -m slimlm.lm_eval_plugin run --model slimlm --model_args path=ARTIFACT --tasks TASK --include_path DIR

or from Python: ``import slimlm.lm_eval_plugin`` then ``lm_eval.simple_evaluate(model="slimlm", ...)``.
The three calls are :class:`slimlm.eval.lm.SlimlmLM`'s, so lm-eval's numbers and slimlm's own
``slimlm tasks`` agree by construction.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from slimlm.eval.lm import SlimlmLM
from slimlm.models import LoadedModel, load


@register_model("slimlm")
class SlimlmEvalLM(LM):
    """``--model_args path=default|FOLDER|FILE.gguf[,batch_tokens=4096,max_length=2048]``."""

    def __init__(self, path: str = "default", batch_tokens: int = 4096, max_length: int = 2048,
                 loaded: LoadedModel | None = None, **lm_eval_kwargs: Any) -> None:
        super().__init__()
        # lm-eval also passes batch_size/device/max_batch_size; batching here is by token budget.
        self.slm = SlimlmLM(loaded or load(path), batch_tokens=int(batch_tokens), max_length=int(max_length))

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.slm.tokenizer, "name_or_path", "slimlm")).replace("/", "__")

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self.slm.loglikelihood([r.args for r in requests])

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        return self.slm.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        return self.slm.generate_until([r.args for r in requests])


def main() -> None:
    """lm-eval's own command line, with ``slimlm`` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
