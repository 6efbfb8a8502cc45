"""meter.pki"""
