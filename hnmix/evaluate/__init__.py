"""The evaluation layer: frozen-feature evaluation (`python -m hnmix.evaluate`: `cli`) and the kNN
monitor the trainer runs (`monitor`); models and splits to evaluate, their features, the kNN and
linear probes, lincls (the papers' linear evaluation) and MoCHi's hardness numbers.
"""
