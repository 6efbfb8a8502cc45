"""meter.provider"""
