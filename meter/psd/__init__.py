"""meter.psd"""
