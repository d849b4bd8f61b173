"""The checkpoint's tensors by the model's parameter names, mapped as from_pretrained maps them.

transformers 5 loads some layouts converted (transformers.conversion_mapping): a Mixture-of-
Experts checkpoint stores every expert's Linears (`mlp.experts.3.gate_proj.weight`) while the
model holds them fused (`mlp.experts.gate_up_proj`: experts x 2 intermediate x hidden), and
Mixtral's `block_sparse_moe` becomes `mlp`. The streamed pipeline reads one layer at a time from
the shards, so it maps the keys here with transformers' own code, as its loader does: the same
renamings and converters, the experts in the same order, the same stack and concatenation. On
the way out, ModelOpt's quant-aware reverse (export.quant_aware_conversion, what
export_hf_checkpoint applies to the whole state dict) gives the checkpoint its hub names back.
transformers 4.x has no conversion mapping: the model's names are the checkpoint's.
"""
from __future__ import annotations

from copy import deepcopy
from functools import partial

from ..core.events import PayloadError


def _conversions(model) -> list:
    """The model's weight transforms as from_pretrained gets them (none before transformers 5)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
    except ImportError:
        return []
    return get_model_conversion_mapping(model) or []


class MappedWeights:
    """A streaming.ShardReader seen through the model's conversion mapping: `in`, `nbytes` and
    `read_many` by the model's parameter names; `model_key` of a checkpoint key. Marks on the
    model the transforms the checkpoint used (`_weight_conversions`), as from_pretrained does:
    the export reverses exactly those."""

    def __init__(self, reader, model):
        self.reader = reader
        self.config = model.config
        self.groups: dict[str, tuple] = {}   # first model key -> (transform or None, [(checkpoint key, pattern)])
        self.group_of: dict[str, str] = {}   # model key -> its group's first model key
        self._model_key: dict[str, str] = {}  # checkpoint key -> model key
        conversions = _conversions(model)
        if not conversions:
            for key in reader.where:
                self.groups[key], self.group_of[key], self._model_key[key] = (None, [(key, None)]), key, key
            model._weight_conversions = []
            return
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        converters = [c for c in conversions if isinstance(c, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        meta = model.state_dict()
        # transformers' loader (core_model_loading.convert_and_load_state_dict_in_model), keys
        # only: sorted the same way, so the experts stack in the same order
        for key in sorted(reader.where, key=dot_natural_key):
            target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
            if target not in meta and key in meta:
                target, pattern = rename_source_key(key, [], [], model.base_model_prefix, meta)
            self._model_key[key] = target
            if target not in meta:
                continue  # a key the model has no parameter for (from_pretrained ignores it too)
            converter = by_pattern[pattern] if pattern is not None else None
            _, sources = self.groups.setdefault(target, (converter, []))
            sources.append((key, pattern))
            self.group_of[target] = target
            if converter is not None:  # one source to several targets (a fused q/k/v split)
                for other in converter.target_patterns[1:]:
                    self.group_of.setdefault(target.replace(converter.target_patterns[0], other), target)
        model._weight_conversions = [c for c in conversions if c.was_used()]

    def __contains__(self, name: str) -> bool:
        return name in self.group_of

    def nbytes(self, name: str) -> int:
        """The checkpoint bytes behind a parameter (a group's, counted on its first parameter)."""
        if self.group_of.get(name) != name:
            return 0
        return sum(self.reader.nbytes(key) for key, _ in self.groups[name][1])

    def model_key(self, key: str) -> str:
        """The model's name for checkpoint key `key` (itself when nothing maps it)."""
        return self._model_key.get(key, key)

    def read_many(self, names, dtype) -> dict:
        """{name: tensor} for the model's parameter `names`, each group converted once."""
        out = {}
        for first in dict.fromkeys(self.group_of[n] for n in names):
            out.update(self._convert(first, dtype))
        return {n: out[n] for n in names}

    def _convert(self, first: str, dtype) -> dict:
        converter, sources = self.groups[first]
        if converter is None:
            return {first: self.reader.read(sources[0][0], dtype)}
        transform = deepcopy(converter)
        for key, pattern in sources:
            transform.add_tensor(first, key, pattern, partial(self.reader.read, key, dtype))
        # loading_info None: a failed operation raises (the loader would log it and skip the weight)
        converted = transform.convert(first, config=self.config)
        return {k: v[0] if isinstance(v, list) else v for k, v in converted.items()}


class HubNames:
    """The export's tensor and module names back in the checkpoint's namespace: ModelOpt's
    quant-aware reverse of the transforms the load used (MappedWeights marks them), applied to
    one layer's state dict at a time (its splits and renames stay within a layer)."""

    def __init__(self, model):
        self.model = model
        self.rules = None
        if not getattr(model, "_weight_conversions", None):
            return  # nothing was converted: the names are the checkpoint's
        from modelopt.torch.export import quant_aware_conversion as qac

        try:
            self.rules = qac._build_reverse_rules(model)
            self.mapper = qac.build_reverse_name_mapper(model)
        except qac.QuantConversionUnsupportedError as e:
            raise PayloadError(f"streamed mode cannot give this model's converted weights their checkpoint "
                               f"names back ({e}); use --mode whole", kind="input") from None

    def state_dict(self, tensors: dict) -> dict:
        if self.rules is None:
            return tensors
        from modelopt.torch.export import quant_aware_conversion as qac

        split, rename, fused_leaves = self.rules
        try:
            qac._assert_experts_pre_expanded(tensors, fused_leaves)
            return qac.apply_reverse_rules(tensors, split, rename)
        except qac.QuantConversionUnsupportedError as e:  # the whole path would keep the model's names
            raise PayloadError(f"streamed mode cannot give this layer's tensors their checkpoint names back "
                               f"({e}); use --mode whole", kind="input") from None

    def quant_config(self, quant_config: dict) -> None:
        """hf_quant_config's exclude_modules and quantized_layers renamed in place."""
        if self.rules is not None:
            from modelopt.torch.export import quant_aware_conversion as qac

            qac.revert_quant_config_names(quant_config.get("quantization", {}), self.mapper)
