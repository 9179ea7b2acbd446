"""The methods: MoCo v1/v2/v3, BYOL and SimSiam on one Siamese base (siamese.py), with their
heads, the key queue and the BatchNorm policies that keep a query from seeing its key."""
