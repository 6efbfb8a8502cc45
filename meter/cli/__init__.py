"""meter.cli"""
