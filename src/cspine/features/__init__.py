"""Hand-made per-vertebra statistics (the lucency features) and the linear model fitted on them.

A stage of its own beside the networks: :mod:`cspine.features.config` holds every constant in one frozen,
versioned config that is saved with each classifier; :mod:`cspine.features.lucency` and
:mod:`cspine.features.bone_region` compute the statistics at crop time; :mod:`cspine.features.linear` standardises
them and fits the logistic regression whose logits are added to the network's at training and inference.
"""
